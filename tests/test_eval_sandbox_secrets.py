"""The human-eval sandbox against a program that goes for the trainer's secrets.

The attacker reads what a pod holds: the trainer's and another process's /proc/<pid>/
environ and cmdline, the ServiceAccount token (a stand-in at the path the kubelet mounts),
~/.aws, the Hugging Face token, ~/.netrc, ~/.config, a secret file elsewhere; then it copies
what it got into stderr and its exit message. Each layer is tried alone (the audit hook,
the kernel view, the non-dumpable trainer, redaction), then all together, then through a
whole `finetune train` whose human-eval problem is the attack: no planted value may reach
evaluation.json, the log, storage or the FineTuneJob's status.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from finetune_operator.testing.kube_emulator import wait_for
from finetune_trainer import contract
from finetune_trainer import process_guard, secret_env
from finetune_trainer.evaluation.sandbox import OUTPUT_TAIL, SandboxLimits, kernel_view, run_program

FAST = SandboxLimits(timeout_seconds=10)
REPO = Path(__file__).resolve().parent.parent
SA_TOKEN = Path(contract.SERVICE_ACCOUNT_DIR) / "token"
ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD")


def _secret(label: str) -> str:
    return f"planted-{label}-{uuid.uuid4().hex}"


@dataclass
class Planted:
    env: dict[str, str]  # in the trainer's environment: readable from /proc/<trainer>/environ
    files: dict[str, tuple[Path, str]]  # the known secret places: name -> (path, its secret)
    outside: tuple[Path, str]  # a secret file in no known place (the audit hook alone keeps it)
    other_pid: int  # another process of the same user, a secret on its command line
    other_secret: str
    cleanup: list[Path] = field(default_factory=list)

    def values(self, *, outside: bool = True) -> list[str]:
        out = [*self.env.values(), *(s for _, s in self.files.values()), self.other_secret]
        return out + [self.outside[1]] if outside else out

    def unredactable(self) -> list[str]:
        """Secrets redaction cannot catch (it knows the environment's values and the token
        files): only keeping them out of reach does."""
        files = [s for name, (_, s) in self.files.items() if name not in ("serviceaccount-token", "hf-token")]
        return [*files, self.other_secret, self.outside[1]]


def plant_service_account_token(secret: str) -> list[Path]:
    """A stand-in token at the path the kubelet mounts it; what it created, to remove."""
    if SA_TOKEN.exists():
        pytest.fail(f"{SA_TOKEN} exists already (a real pod?): this test plants its own there")
    created, folder = [], SA_TOKEN.parent
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    try:
        for path in reversed(missing):
            path.mkdir()
            created.append(path)
        SA_TOKEN.write_text(secret)
        created.append(SA_TOKEN)
    except PermissionError:
        for path in reversed(created):
            path.unlink() if path.is_file() else path.rmdir()
        return []
    return created


@pytest.fixture
def planted(tmp_path, monkeypatch):
    env = {name: _secret(name.lower()) for name in ENV_SECRETS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    home = tmp_path / "home"
    files: dict[str, tuple[Path, str]] = {}
    for name, relative in {"aws": ".aws/credentials", "hf-token": ".cache/huggingface/token", "netrc": ".netrc",
                           "config": ".config/gh/hosts.yml"}.items():
        path, value = home / relative, _secret(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"secret = {value}\n")
        files[name] = (path, value)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("HF_HOME", raising=False)
    token = _secret("sa-token")
    created = plant_service_account_token(token)
    if created:
        files["serviceaccount-token"] = (SA_TOKEN, token)
    outside = tmp_path / "elsewhere" / "notes.txt"
    outside.parent.mkdir()
    outside.write_text(_secret("outside"))
    other_secret = _secret("other-process")
    other = subprocess.Popen([sys.executable, "-c", "import sys, time; time.sleep(120)", other_secret],
                             env={**os.environ, "OTHER_PROCESS_TOKEN": other_secret})
    try:
        yield Planted(env, files, (outside, outside.read_text()), other.pid, other_secret, created)
    finally:
        other.kill()
        other.wait()
        for path in reversed(created):
            path.unlink() if path.is_file() else path.rmdir()


def attack_targets(planted: Planted) -> dict[str, str]:
    """What the program tries to read, by name."""
    targets = {}
    for pid_name, pid in (("trainer", os.getpid()), ("other", planted.other_pid)):
        for part in ("environ", "cmdline", "maps", "mem"):
            targets[f"{pid_name}-{part}"] = f"/proc/{pid}/{part}"
    targets["trainer-fd-via-root"] = f"/proc/{os.getpid()}/root{planted.files['aws'][0]}"
    for name, (path, _) in planted.files.items():
        targets[name] = str(path)
    targets["outside"] = str(planted.outside[0])
    return targets


def attack_program(targets: dict[str, str]) -> str:
    """Reads each target, picks the planted values out of what it got (as an attacker picks
    AWS_SECRET_ACCESS_KEY= out of an environ) and copies them into its exit message, the
    last line of stderr. Stdout: one JSON line saying what each read and listing did."""
    return textwrap.dedent(
        f"""
        import json, os, re
        got, seen = [], {{}}
        targets = {targets!r}
        targets["parent-environ"] = f"/proc/{{os.getppid()}}/environ"
        for name, path in targets.items():
            try:
                with open(path, "rb") as f:
                    data = f.read(1000000) if not path.endswith("/mem") else f.read(1)
                got += re.findall(r"planted-[a-z_-]+-[0-9a-f]{{32}}", data.decode("latin-1"))
                seen[name] = f"READ {{len(data)}}"
            except Exception as e:
                seen[name] = f"DENIED {{type(e).__name__}}" + (" sandbox" if "sandbox:" in str(e) else "")
        listings = {{}}
        for folder in ("/proc", {contract.SECRETS_MOUNT_ROOT!r}):
            try:
                entries = os.listdir(folder)
                listings[folder] = sorted(e for e in entries if e.isdigit())[:10] if folder == "/proc" else entries
            except Exception as e:
                listings[folder] = f"DENIED {{type(e).__name__}}" + (" sandbox" if "sandbox:" in str(e) else "")
        print(json.dumps({{"reads": seen, "listings": listings}}))
        raise SystemExit("LEAK " + " ".join(sorted(set(got))))
        """
    )


def report(result) -> tuple[dict[str, str], dict]:
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return out["reads"], out["listings"]


def assert_no_secret(text: str, values: list[str]) -> None:
    leaked = [v for v in values if v in text]
    assert not leaked, f"leaked {leaked}"


def test_control_the_attack_reads_everything_with_no_guard(planted):
    """Both read guards off (no hook, no namespace): the same program gets every secret it
    goes for. So the tests below fail if a layer stops working."""
    result = run_program(attack_program(attack_targets(planted)), FAST, isolation="audit-hook", guard_reads=False)
    seen, _ = report(result)
    for name in ("other-environ", "other-cmdline", "outside", "aws", "hf-token", "netrc", "config"):
        assert seen[name].startswith("READ"), (name, seen[name])
    if os.geteuid() == 0:  # a root program reads even a non-dumpable trainer's files
        assert seen["trainer-environ"].startswith("READ")
    for value in planted.unredactable():
        assert value in result.stderr  # once read, nothing hides these


def test_the_audit_hook_alone_refuses_every_read(planted):
    targets = attack_targets(planted)
    result = run_program(attack_program(targets), FAST, isolation="audit-hook")
    seen, listings = report(result)
    assert set(seen) == {*targets, "parent-environ"}
    for name, outcome in seen.items():
        assert outcome == "DENIED PermissionError sandbox", (name, outcome)
    assert listings == {"/proc": "DENIED PermissionError sandbox",
                        contract.SECRETS_MOUNT_ROOT: "DENIED PermissionError sandbox"}
    assert result.status == "failed" and result.stderr.strip().splitlines()[-1] == "LEAK"
    assert_no_secret(result.stdout + result.stderr, planted.values())


def test_the_hook_still_lets_a_program_read_its_own_files_and_the_standard_library():
    result = run_program(textwrap.dedent(
        """
        import json, os, re, collections, decimal, fractions, datetime, statistics, heapq, typing, zoneinfo
        open("data.txt", "w").write("mine")
        print(open("data.txt").read(), open("/proc/self/status").read().split()[0], len(os.urandom(4)))
        print(sorted(os.listdir(".")), json.__file__.endswith("__init__.py"))
        print(datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")).utcoffset())
        """), FAST)
    assert result.status == "passed", result.stderr
    assert result.stdout.splitlines() == ["mine Name: 4", "['data.txt', 'program.py'] True", "1:00:00"]


@pytest.mark.skipif(not (kernel_view() and kernel_view().hides),
                    reason="this kernel or user may not create mount and PID namespaces (a pod without "
                           "CAP_SYS_ADMIN and without user namespaces: the audit hook and the non-dumpable "
                           "trainer are what hold there, tested above and below)")
def test_the_kernel_view_alone_hides_processes_and_the_known_secret_places(planted):
    """The read guard off: the namespaces alone. No other process exists in its /proc, and
    every known secret place is an empty tmpfs or /dev/null."""
    targets = attack_targets(planted)
    result = run_program(attack_program(targets), FAST, guard_reads=False)
    seen, listings = report(result)
    for name in [n for n in targets if n.startswith(("trainer-", "other-"))]:
        assert seen[name] == "DENIED FileNotFoundError", (name, seen[name])
    for name in planted.files:
        assert seen[name] in ("DENIED FileNotFoundError", "READ 0"), (name, seen[name])
    pids = [int(p) for p in listings["/proc"]]
    assert len(pids) <= 3 and os.getpid() not in pids and planted.other_pid not in pids  # itself, its shell
    assert listings[contract.SECRETS_MOUNT_ROOT] == []
    assert seen["outside"].startswith("READ")  # in no known place: only the hook guards it (above)
    assert_no_secret(result.stdout + result.stderr, planted.values(outside=False))


def test_all_layers_together_nothing_secret_reaches_the_result(planted):
    result = run_program(attack_program(attack_targets(planted)), FAST)
    seen, _ = report(result)
    assert result.status == "failed" and result.stderr.strip().splitlines()[-1] == "LEAK"
    assert all(o.startswith("DENIED") for o in seen.values()), seen
    assert_no_secret(result.stdout + result.stderr, planted.values())


# ------------------------------------------------------------------ the non-dumpable trainer

VICTIM = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import process_guard
if sys.argv[2] == "guarded":
    assert process_guard.mark_not_dumpable() and process_guard.is_dumpable() is False
print(os.getpid(), flush=True)
time.sleep(60)
"""


def _as_another_user() -> list[str]:
    """Victim and attacker run as one non-root user: root would read anything."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.fail("setpriv (util-linux) is needed to run the victim as a non-root user")
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.mark.parametrize("guarded", [False, True], ids=["control-dumpable", "not-dumpable"])
def test_a_non_dumpable_process_keeps_its_environ_from_the_same_user(guarded):
    """process_guard, run alone as a non-root user: the kernel then refuses that same user's
    read of its /proc/<pid>/environ (the control shows the read works without it)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:  # /tmp: a path the other user can reach
        os.chmod(folder, 0o755)
        shutil.copy(REPO / "trainer-image" / "finetune_trainer" / "process_guard.py", folder)
        _victim_and_attacker(folder, guarded)


def _victim_and_attacker(folder: str, guarded: bool) -> None:
    user, secret = _as_another_user(), _secret("victim")
    victim = subprocess.Popen([*user, sys._base_executable, "-I", "-c", VICTIM, str(folder),
                               "guarded" if guarded else "plain"],
                              stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin", "VICTIM_TOKEN": secret})
    try:
        pid = int(victim.stdout.readline())
        attacker = subprocess.run([*user, "cat", f"/proc/{pid}/environ"], capture_output=True)
        if guarded:
            assert attacker.returncode != 0 and b"Permission denied" in attacker.stderr
            assert secret.encode() not in attacker.stdout
        else:
            assert attacker.returncode == 0 and secret.encode() in attacker.stdout
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.parametrize("call", [
    "from finetune_trainer.evaluation.sandbox import run_program\nassert run_program('pass').passed",
    "from finetune_trainer.launch import run_torchrun\ntry:\n    run_torchrun(['--help'])\nexcept SystemExit:\n    pass",
], ids=["trainer-before-its-first-sandbox", "torchrun-agent"])
def test_our_secret_holding_processes_mark_themselves_not_dumpable(call):
    program = f"from finetune_trainer import process_guard\nassert process_guard.is_dumpable()\n{call}\n" \
              "print('dumpable', process_guard.is_dumpable())"
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "dumpable False"


def test_the_launcher_runs_torchrun_through_the_guard():
    from finetune_trainer.launch import torchrun_command

    assert torchrun_command("c.yaml", [])[1:3] == ["-m", "finetune_trainer.launch"]


# ------------------------------------------------------------------------------- redaction

def test_secret_names_and_values():
    env = {"AWS_SECRET_ACCESS_KEY": "aws-secret-1", "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "HF_TOKEN": "hf_abcdef",
           "WANDB_API_KEY": "wandb-key-1", "MLFLOW_TRACKING_PASSWORD": "pw-123456", "DB_SECRET": "dbsecret",
           "LANG": "C.UTF-8", "TOKENIZERS_PARALLELISM": "false", "SHORT_TOKEN": "abc", "HOME": "/nonexistent"}
    values = secret_env.secret_values(env)
    assert set(values) == {"aws-secret-1", "AKIAEXAMPLE", "hf_abcdef", "wandb-key-1", "pw-123456", "dbsecret"}
    assert list(values) == sorted(values, key=lambda v: (-len(v), v))  # a secret inside another: the longer first


def test_secret_files_named_by_the_environment_are_secrets(tmp_path):
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.projected-token\n")
    env = {contract.ENV_STATUS_TOKEN_FILE: str(token), "HOME": str(tmp_path / "none")}
    assert "eyJhbGciOiJSUzI1NiJ9.projected-token" in secret_env.secret_values(env)


@pytest.mark.parametrize("text, expected", [
    ("key=s3cr3t-value!", "key=[redacted]!"),
    ("cr3t-value and more", "[redacted] and more"),  # a tail that starts inside the secret
    ("ends with s3cr3t-v", "ends with [redacted]"),  # output cut inside the secret
    ("nothing here", "nothing here"),
    ("s3c", "s3c"),  # shorter than MIN_SECRET_LENGTH: ordinary text
])
def test_redact(text, expected):
    assert secret_env.redact(text, ["s3cr3t-value"]) == expected


def test_a_program_that_prints_a_secret_gets_it_redacted(monkeypatch):
    """It cannot read the environment, but it may know a value another way (a model that
    memorised it): stored output never carries it, not even cut in half by the tail."""
    secret = _secret("known")
    monkeypatch.setenv("SOME_SERVICE_TOKEN", secret)
    result = run_program(f"import sys\nprint({secret!r})\nsys.stderr.write({secret!r} + 'x' * {OUTPUT_TAIL - 8})\n"
                         "raise SystemExit(1)", FAST)
    assert result.stdout.strip() == "[redacted]"
    # unredacted, the kept tail would start with the secret's last 8 characters
    assert result.stderr == secret_env.REDACTED[-8:] + "x" * (OUTPUT_TAIL - 8)


# ------------------------------------------------------------- a whole human-eval, end to end

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_finetune_whose_benchmark_attacks_leaks_nothing(tmp_path, tiny_model_dir, planted, cluster, emulator):
    """`finetune train` as a pod runs it (status to the API emulator, storage file://), its
    human-eval problem the attack (a benchmark file from elsewhere: its test code runs in the
    same program as the model's completion). The attack runs and fails; no planted value is
    in evaluation.json, any file of the output or storage, the log, or the status."""
    cluster.apply_job("demo", {"model": {"base_model": "x"}})
    rows = [{"instruction": "Say hi.", "output": "hi"}] * 8
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = tmp_path / "problems.jsonl"
    attack = attack_program(attack_targets(planted))
    # The model's completion lands inside a raw string the problem opens and its test closes,
    # so whatever a random model writes, the attack is a valid program and runs.
    problems.write_text(json.dumps({
        "task_id": "Attack/0", "entry_point": "add",
        "prompt": attack + "\ndef add(a, b):\n    return a + b\n\nCOMPLETION = r\"\"\"",
        "test": "\"\"\"\ndef check(candidate):\n    assert candidate(1, 2) == 3\n",
    }) + "\n")
    storage, out = tmp_path / "storage", tmp_path / "out"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"base_model": str(tiny_model_dir)},
        "training": {"max_steps": 1, "max_seq_length": 64, "mixed_precision": "no"},
        "dataset": {"train_path": str(data)},
        "output": {"output_dir": str(out), "storage_uri": f"file://{storage}", "logging_steps": 1},
        "evaluation": {"benchmarks": ["human-eval"],
                       "human_eval": {"problems_path": str(problems), "max_new_tokens": 4}},
    }))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           contract.ENV_STATUS_URL: f"{emulator.url}/apis/finetune.dev/v1alpha1/namespaces/default/finetunejobs/demo/status"}
    proc = subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((storage / "final" / "evaluation.json").read_text())
    [entry] = report["after"]["human-eval"]["details"]["per_problem"]
    assert entry["status"] == "failed" and entry["error"].startswith("LEAK")  # the attack ran, to its end
    evaluation = wait_for(lambda: cluster.job("demo")["status"].get("evaluation"), what="status.evaluation")
    assert evaluation["metrics"]
    values = planted.values()
    assert_no_secret(proc.stdout + proc.stderr, values)
    assert_no_secret(json.dumps(cluster.job("demo")["status"]), values)
    for folder in (out, storage):
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert_no_secret(path.read_bytes().decode("latin-1"), values)
