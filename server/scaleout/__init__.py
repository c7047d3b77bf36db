"""Scale-out: the same gRPC API on Ray Serve (`openemploi serve --ray`), the only package that imports `ray`.

Gateway (ingress, the project's servicers) -> Embedder replicas (ModelRegistry each) and
CollectionShard deployments (a CollectionManager each). See app.py for the entry points.
"""

from .app import RayDeployment, build_application, deploy
from .options import APP_NAME, RayOptions

__all__ = ["APP_NAME", "RayDeployment", "RayOptions", "build_application", "deploy"]
