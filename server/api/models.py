"""ModelService: list, load (warm then switch), unload (drain then free), set the default."""

from __future__ import annotations

import logging

import grpc

from openemploi.v1 import models_pb2, models_pb2_grpc

from ..runtime.registry import ModelRegistry
from ..runtime.repository import ModelNotBuilt, ModelNotFound
from . import rpc
from .errors import failed_precondition, invalid

log = logging.getLogger(__name__)


class ModelServicer(models_pb2_grpc.ModelServiceServicer):
    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def info(self, name: str) -> models_pb2.ModelInfo:
        registry = self._registry
        current = registry.current(name)
        loaded = {m.version.version: m for m in registry.models() if m.name == name}
        versions = []
        built = registry.repository.versions(name)
        for version in built:
            model = loaded.get(version.version)
            if model is None:
                versions.append(models_pb2.ModelVersionInfo(version=version.version, state="built", built_at=version.built_at))
            else:
                info = model.encoder.info
                versions.append(
                    models_pb2.ModelVersionInfo(
                        version=version.version,
                        state=model.state,
                        device=info.device,
                        precision=info.precision,
                        built_at=version.built_at,
                        detail=info.detail,
                    )
                )
        reference = current.version if current else (built[-1] if built else None)
        return models_pb2.ModelInfo(
            name=name,
            dim=reference.dim if reference else 0,
            max_tokens=reference.max_tokens if reference else 0,
            current_version=current.version.version if current else "",
            is_default=name == registry.default_model,
            versions=versions,
        )

    @rpc.unary
    async def ListModels(self, request: models_pb2.ListModelsRequest, call: rpc.Call) -> models_pb2.ListModelsResponse:
        names = self._registry.repository.names()
        return models_pb2.ListModelsResponse(models=[self.info(n) for n in names], default_model=self._registry.default_model)

    @rpc.unary
    async def LoadModel(self, request: models_pb2.LoadModelRequest, call: rpc.Call) -> models_pb2.LoadModelResponse:
        if not request.name:
            raise invalid("name is empty")
        try:
            await self._registry.load(request.name, request.version)
        except (ModelNotFound, ModelNotBuilt):
            raise
        except Exception as exc:  # a bad file, a failed warm-up, out of memory: the serving version stays
            log.exception("LoadModel %s failed", request.name, extra={"request_id": call.request_id})
            raise failed_precondition(
                f"loading {request.name} {request.version or '(newest)'} failed: {exc}; the serving version is unchanged"
            ) from exc
        return models_pb2.LoadModelResponse(model=self.info(request.name))

    @rpc.unary
    async def UnloadModel(self, request: models_pb2.UnloadModelRequest, call: rpc.Call) -> models_pb2.UnloadModelResponse:
        unloaded = await self._registry.unload(request.name, request.version)
        return models_pb2.UnloadModelResponse(unloaded=unloaded)

    @rpc.unary
    async def SetDefault(self, request: models_pb2.SetDefaultRequest, call: rpc.Call) -> models_pb2.SetDefaultResponse:
        previous = self._registry.set_default(request.name)
        return models_pb2.SetDefaultResponse(default_model=request.name, previous=previous)


def add_to_server(servicer: ModelServicer, server: grpc.aio.Server) -> None:
    rpc.register_service(servicer, server, models_pb2, "ModelService")
