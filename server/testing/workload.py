"""Deterministic Upsert requests for fault injection: unique ids, random unit vectors, distinct French texts.

Every document sent is kept (Doc), so that the checks after a fault compare what the server returns
with exactly what it was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openemploi.v1 import index_pb2 as ipb

DIM = 384  # the default model's dimension, that of the explicit vectors
COLLECTION = "chaos"
DOCS_PER_REQUEST = 20
TEXT_REQUEST_SHARE = 0.25  # share of Upsert requests that carry text documents (2 of their 20)
TEXTS_PER_TEXT_REQUEST = 2

METIERS = [
    "Boulanger",
    "Cariste",
    "Aide-soignant",
    "Développeur Python",
    "Maçon coffreur",
    "Comptable",
    "Serveur en brasserie",
    "Plombier chauffagiste",
    "Infirmière de nuit",
    "Chauffeur poids lourd",
    "Électricien du bâtiment",
    "Agent d'accueil",
    "Préparateur de commandes",
    "Cuisinier",
    "Assistante maternelle",
    "Technicien de maintenance",
    "Vendeur en boulangerie",
]
VILLES = ["Lyon", "Paris", "Nantes", "Lille", "Marseille", "Toulouse", "Rennes", "Strasbourg", "Bordeaux", "Dijon"]
CONTRATS = ["CDI", "CDD", "Intérim", "Alternance", "Saisonnier"]
DETAILS = [
    "travail en équipe",
    "horaires décalés",
    "permis B exigé",
    "débutant accepté",
    "expérience de deux ans",
    "week-ends travaillés",
    "poste à temps partiel",
    "mutuelle et tickets restaurant",
    "formation assurée",
    "port de charges",
    "contact clientèle",
    "lecture de plans",
    "habilitation électrique",
    "CACES R489",
]
SKILLS = ["HACCP", "Python", "SQL", "CACES R489", "soins d'hygiène", "coffrage", "accueil", "gestion des stocks", "Excel"]


@dataclass
class Doc:
    id: str
    text: str
    vector: np.ndarray | None  # None: the server embeds `text`
    metadata: dict[str, str]
    skills: list[str]

    def message(self) -> ipb.Document:
        message = ipb.Document(id=self.id, text=self.text, metadata=self.metadata, skills=self.skills)
        if self.vector is not None:
            message.vector.extend(self.vector.tolist())
        return message


class Workload:
    """Deterministic documents from a seed: unique ids, random unit vectors, distinct French texts."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.next_doc = 0
        self.next_request = 0

    def _text(self, n: int) -> str:
        rng = self.rng
        details = ", ".join(str(d) for d in rng.choice(DETAILS, size=3, replace=False))
        return (
            f"{rng.choice(METIERS)} à {rng.choice(VILLES)} en {rng.choice(CONTRATS)} : {details}. "
            f"Offre numéro {n}, salaire {int(rng.integers(1700, 4200))} euros brut mensuel."
        )

    def request(self, cycle: int) -> list[Doc]:
        rng = self.rng
        number = self.next_request
        self.next_request += 1
        texts = TEXTS_PER_TEXT_REQUEST if rng.random() < TEXT_REQUEST_SHARE else 0
        vectors = rng.normal(size=(DOCS_PER_REQUEST, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        docs = []
        for j in range(DOCS_PER_REQUEST):
            n = self.next_doc
            self.next_doc += 1
            embedded = j < texts
            metadata = {
                "ville": str(rng.choice(VILLES)),
                "contrat": str(rng.choice(CONTRATS)),
                "cycle": str(cycle),
                "request": str(number),
                "position": str(j),
                "source": "text" if embedded else "vector",
            }
            skills = sorted({str(s) for s in rng.choice(SKILLS, size=int(rng.integers(0, 4)), replace=False)})
            text = self._text(n) if embedded else f"document vectoriel {n}"
            docs.append(Doc(f"doc-{n:07d}", text, None if embedded else vectors[j], metadata, skills))
        return docs


EMBED_TEXTS = [  # what clients embed around a fault: the same text must give the same vector after it
    "Aide-soignant en EHPAD, soins d'hygiène et de confort, travail de nuit un week-end sur deux.",
    "Développeur Python / Django, API REST, PostgreSQL, tests automatisés et intégration continue.",
    "Cariste CACES R489 catégorie 3, préparation de commandes, inventaires et gestion des stocks.",
    "Boulangère : fabrication du pain, des viennoiseries et des pâtisseries, respect des règles HACCP.",
]
