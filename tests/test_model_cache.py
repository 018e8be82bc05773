"""The model cache's one-builder rule (builtin.materialise): two fetchers of one model into one
cache (two pods on a shared volume, a pod and its replacement) never remove each other's work."""

from __future__ import annotations

import threading

from finetune_trainer.model.builtin import materialise


def whole(path):
    return (path / "done").is_file()


def test_a_second_builder_waits_for_the_first_and_uses_its_result(tmp_path):
    target = tmp_path / "cache" / "model"
    builds, inside, release, asked = [], threading.Event(), threading.Event(), threading.Event()

    def build(tmp):
        builds.append(tmp)
        inside.set()
        assert release.wait(60)
        (tmp / "weights").write_bytes(b"w" * 1024)
        (tmp / "done").write_text("")

    def second_complete(path):
        asked.set()  # its first look, before the lock: nothing there yet
        return whole(path)

    results = {}
    first = threading.Thread(target=lambda: results.setdefault("first", materialise(target, build, complete=whole)))
    first.start()
    assert inside.wait(60)
    second = threading.Thread(target=lambda: results.setdefault(
        "second", materialise(target, build, complete=second_complete)))
    second.start()
    assert asked.wait(60)  # the second has looked and found nothing: without the lock it would build now
    release.set()
    first.join(60)
    second.join(60)
    assert len(builds) == 1, builds
    assert results == {"first": target, "second": target}
    assert (target / "weights").read_bytes() == b"w" * 1024
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]  # no temp folder left


def test_a_killed_builders_leftovers_are_removed_and_the_cache_built(tmp_path):
    target = tmp_path / "model"
    (tmp_path / "model.abc123").mkdir()  # a builder killed midway
    (tmp_path / "model.abc123" / "half").write_bytes(b"x")
    (tmp_path / "model").mkdir()  # an incomplete cache

    def build(tmp):
        (tmp / "done").write_text("")

    assert materialise(target, build, complete=whole) == target and whole(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"

    def build(tmp):
        (tmp / "half").write_bytes(b"x")
        raise RuntimeError("download cut")

    try:
        materialise(target, build, complete=whole)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the build's error was swallowed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]
