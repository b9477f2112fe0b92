"""Replicas: a second copy of each study's store, elsewhere (issue 12).

A replica mirrors the store's marker, objects, manifests and HEAD under an
``s3://BUCKET/PREFIX`` or ``file:///PATH`` URL (store_format.md,
"Replicas").  This package may import ``eidetic.core`` and
``eidetic.store`` only; ``eidetic.server`` and ``eidetic.fsck`` use it.
boto3 is imported by ``eidetic.replica.s3`` alone, on first use of an
s3:// replica, so importing this package needs no boto3.
"""

from .backend import Backend, FileBackend, RemoteInfo, ReplicaConfig, open_backend

__all__ = ["Backend", "FileBackend", "RemoteInfo", "ReplicaConfig", "open_backend"]
