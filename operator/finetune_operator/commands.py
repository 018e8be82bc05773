"""Operator subcommands on `finetune`'s CLI: crd, render, run, operator, status.

Imported by cli.py on every invocation, so this module imports nothing heavy at the top:
each command loads its own module (render, local, kopf) inside its function, and
`finetune validate` stays sub-second.
"""

from __future__ import annotations

import argparse
import sys

from finetune_trainer.cli import EXIT_OK, print_issues, register


def _manifest_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-f", "-c", required=True, metavar="FILE", help="FineTuneJob manifest (finetune.yaml)")
    p.add_argument("--namespace", "-n", default=None, help="namespace when the manifest has none (default: default)")


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", dest="trainer_image", default=None, help="trainer image when the spec sets none")
    p.add_argument("--default-storage-uri", default=None, help="storage when the spec has no spec.storage")
    p.add_argument("--forbid-trust-remote-code", action="store_true", help="refuse model.trust_remote_code: true")
    _hub_offline_arg(p)
    _backend_args(p)


def _hub_offline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hub-offline", action="store_true",
                   help="HF_HUB_OFFLINE=1 in every trainer pod: nothing calls the Hugging Face Hub (models come from "
                        "spec.model_volume, the model cache or storage)")


BACKEND_CHOICES = ["auto", "pytorchjob", "trainjob", "jobset"]


def _backend_args(p: argparse.ArgumentParser, *, operator: bool = False) -> None:
    if operator:
        p.add_argument("--default-backend", choices=BACKEND_CHOICES, default="auto",
                       help="backend for jobs without spec.backend (auto: discovery picks TrainJob, JobSet, PyTorchJob)")
        p.add_argument("--backends", default="pytorchjob,trainjob,jobset", metavar="LIST",
                       help="comma-separated backends this operator may create (its RBAC); default all")
    else:
        p.add_argument("--backend", dest="default_backend", choices=BACKEND_CHOICES, default=None,
                       help="backend to render or run when the spec sets none (auto, the default, means pytorchjob "
                            "here: there is no cluster to ask)")
    p.add_argument("--trainjob-runtime", default=None, metavar="NAME",
                   help="ClusterTrainingRuntime for TrainJobs whose spec names none (default torch-distributed)")


def _load_job(args: argparse.Namespace, overrides: list[str]) -> dict:
    """The manifest as a FineTuneJob object: overrides applied to spec, a namespace filled in."""
    from finetune_trainer.config import read_document
    from finetune_trainer.config.loader import apply_overrides, parse_overrides

    from .spec import FineTuneJobSpec

    job = read_document(args.config)
    if overrides and isinstance(job.get("spec"), dict):
        job["spec"] = apply_overrides(job["spec"], parse_overrides(overrides), root=FineTuneJobSpec)
    metadata = job.get("metadata")
    if isinstance(metadata, dict) and not metadata.get("namespace"):
        metadata["namespace"] = args.namespace or "default"
    return job


def cmd_crd(args: argparse.Namespace, overrides: list[str]) -> int:
    from .crd import crd_yaml

    sys.stdout.write(crd_yaml())
    return EXIT_OK


def cmd_render(args: argparse.Namespace, overrides: list[str]) -> int:
    from .render import RenderSettings, check, render, to_yaml

    job = _load_job(args, overrides)
    settings = RenderSettings.from_args(args)
    print_issues([], check(job, settings).warnings, args.config)
    manifests = render(job, settings)
    sys.stdout.write(to_yaml(manifests))
    return EXIT_OK


def _run_args(p: argparse.ArgumentParser) -> None:
    _manifest_arg(p)
    _settings_args(p)
    p.add_argument("--run-dir", default=None, help="where configs, logs and file:// storage go (default: a temp dir)")
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per replica (default: from the spec)")
    p.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                   help="a local directory standing in for a PersistentVolumeClaim (spec.model_volume, model_cache); "
                        "repeatable")


def cmd_run(args: argparse.Namespace, overrides: list[str]) -> int:
    from .local import run_local

    return run_local(_load_job(args, overrides), args)


def _metrics_address(value: str) -> str:
    """--metrics-address as given, once metrics.parse_address takes it (empty: not served): a bad
    one is a usage error here rather than a traceback when the server starts."""
    from .metrics import parse_address

    try:
        if value:
            parse_address(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def _operator_args(p: argparse.ArgumentParser) -> None:
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], help="watch this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", default=None, help="kopf peering object for HA (priority per pod)")
    peering.add_argument("--standalone", action="store_true", help="no peering: the only operator replica")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", metavar="URL", help="kopf's liveness endpoint")
    p.add_argument("--metrics-address", default="0.0.0.0:8081", metavar="HOST:PORT", type=_metrics_address,
                   help="where /metrics (Prometheus text format) is served; empty: not served")
    p.add_argument("--trainer-image", default=None, help="trainer image for jobs whose spec sets none")
    p.add_argument("--default-storage-uri", default=None, help="storage for jobs without spec.storage (s3://...)")
    p.add_argument(
        "--default-storage-credentials-secret", default=None, help="Secret (in each job's namespace) for that storage"
    )
    p.add_argument("--forbid-trust-remote-code", action="store_true", help="refuse jobs with model.trust_remote_code")
    _hub_offline_arg(p)
    _backend_args(p, operator=True)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning"], help="operator log level")


def cmd_operator(args: argparse.Namespace, overrides: list[str]) -> int:
    from .runner import run_operator  # kopf and the Kubernetes client load here only

    return run_operator(args)


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, help="one FineTuneJob (default: every one in the namespace)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", default=None, help="namespace (default: default)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="every namespace")
    p.add_argument("--watch", "-w", action="store_true", help="redraw until interrupted")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS", help="seconds between redraws (--watch)")


def cmd_status(args: argparse.Namespace, overrides: list[str]) -> int:
    from .kube import Kube
    from .runner import load_configuration
    from .status_view import show

    namespace = None if args.all_namespaces else (args.namespace or "default")
    return show(Kube(load_configuration()), namespace=namespace, name=args.name, watch=args.watch,
                interval=args.interval)


register("crd", "print the FineTuneJob CustomResourceDefinition (kubectl apply -f -)")(cmd_crd)
register("status", "every FineTuneJob with progress, loss and ETA, from the cluster (--watch redraws)",
         _status_args)(cmd_status)
register(
    "render",
    "print the Kubernetes objects the operator would create for a FineTuneJob manifest",
    lambda p: (_manifest_arg(p), _settings_args(p)),
)(cmd_render)
register("run", "run a FineTuneJob locally: its Master and Workers as processes on this machine", _run_args)(cmd_run)
register("operator", "run the FineTuneJob operator (kopf)", _operator_args)(cmd_operator)
