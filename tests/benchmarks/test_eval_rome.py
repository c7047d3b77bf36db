"""benchmarks/eval_rome.py's promotion: a fine-tuned model becomes the server's default only when
it beats its base model on the held-out part, and the server reads the decision as its config."""

from __future__ import annotations

from pathlib import Path

from openemploi.config import load_config
from openemploi.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "eval_rome.py"


ev = load_script(SCRIPT, "eval_rome")


def run(model: str, top1: float, top5: float, mrr: float, precision: str = "int8") -> dict:
    return {
        "model": model,
        "precision": precision,
        "version": "v" + model[:3],
        "heldout": {"hybrid": {"top1": top1, "top5": top5, "mrr": mrr}},
    }


def test_the_fine_tuned_model_is_promoted_only_when_it_beats_its_base_held_out():
    base = run("base", 0.903, 0.982, 0.933)
    assert ev.promotion([base, run("tuned", 0.920, 1.0, 0.955)], "tuned", "base").promoted
    assert ev.promotion([base, run("tuned", 0.903, 0.991, 0.900)], "tuned", "base").promoted  # a tie on top-1: top-5 decides
    assert not ev.promotion([base, run("tuned", 0.903, 0.982, 0.933)], "tuned", "base").promoted  # equal is no win
    lost = ev.promotion([base, run("tuned", 0.890, 1.0, 0.990)], "tuned", "base")
    assert not lost.promoted and "does not beat base" in lost.reason
    fp32_only = ev.promotion([base, run("tuned", 0.99, 1.0, 1.0, precision="fp32")], "tuned", "base")
    assert not fp32_only.promoted and "no int8 run of tuned" in fp32_only.reason


def test_a_promotion_is_the_servers_config_and_a_lost_one_withdraws_it(tmp_path):
    path = tmp_path / "var" / "promoted.toml"
    won = ev.promotion([run("base", 0.7, 0.9, 0.8), run("tuned", 0.8, 0.9, 0.8)], "tuned", "base")
    ev.write_promotion(won, {"tuned": "abc123"}, path)
    config = load_config(path)
    assert config.default_model == "tuned" and config.models == ("tuned", "base")
    other_lost = ev.Promotion("other", "base", False, "other does not beat base")
    ev.write_promotion(other_lost, {}, path)
    assert path.is_file()  # another model's defeat leaves this promotion alone
    lost = ev.promotion([run("base", 0.7, 0.9, 0.8), run("tuned", 0.6, 0.9, 0.8)], "tuned", "base")
    ev.write_promotion(lost, {}, path)
    assert not path.exists()
