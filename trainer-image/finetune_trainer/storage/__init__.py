"""Checkpoints and run artifacts in object storage (s3:// or file://). Imports no torch or
transformers; the Trainer callback lives in `finetune_trainer.storage.callback`."""

from .checkpoints import (
    ChecksumMismatch,
    FileEntry,
    Manifest,
    apply_retention,
    download_checkpoint,
    find_resume_checkpoint,
    list_checkpoints,
    list_complete,
    upload_checkpoint,
    upload_file_artifact,
    verify,
    verify_local,
)
from .preemption import PreemptionFlag, install_preemption_handler
from .stores import (
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    TransferSettings,
    open_store,
)
from .uploader import BackgroundUploader, UploaderStatus, node_topology

__all__ = [
    "BackgroundUploader",
    "ChecksumMismatch",
    "FileEntry",
    "Manifest",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "PreemptionFlag",
    "RetryPolicy",
    "StorageError",
    "StorageUnavailable",
    "TransferSettings",
    "UploaderStatus",
    "apply_retention",
    "download_checkpoint",
    "find_resume_checkpoint",
    "install_preemption_handler",
    "list_checkpoints",
    "list_complete",
    "node_topology",
    "open_store",
    "upload_checkpoint",
    "upload_file_artifact",
    "verify",
    "verify_local",
]
