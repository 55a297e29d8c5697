"""Per-example cache: resume after a kill loses nothing and recomputes nothing."""
import pytest
import torch

from t2i_common.cache import ResultCache, fingerprint, map_cached


class Killed(Exception):
    pass


def test_resume_after_simulated_kill(tmp_path):
    key = dict(model="tiny", data=fingerprint(["a", "b"]), S=10)
    calls, kill_at = [], [4]

    def fn(i):
        calls.append(i)
        if len(calls) == kill_at[0]:
            raise Killed()
        return torch.tensor([float(i) ** 2])

    ids = list(range(7))
    with pytest.raises(Killed):
        map_cached(fn, ids, ResultCache("t", key, root=tmp_path), progress=False)
    assert calls == [0, 1, 2, 3]
    cache = ResultCache("t", key, root=tmp_path)
    assert cache.done_ids() == {"0", "1", "2"}
    calls.clear()
    kill_at[0] = -1  # no more kills
    out = map_cached(fn, ids, cache, progress=False)
    assert calls == [3, 4, 5, 6]  # only unfinished examples are computed
    assert [float(out[i]) for i in ids] == [float(i) ** 2 for i in ids]


def test_key_separates_results(tmp_path):
    a = ResultCache("t", dict(S=10), root=tmp_path)
    b = ResultCache("t", dict(S=20), root=tmp_path)
    a.save("x", 1)
    assert a.has("x") and not b.has("x")
    assert ResultCache("t", dict(S=10), root=tmp_path).load("x") == 1
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint(torch.zeros(3)) != fingerprint(torch.ones(3))


def test_chunked_and_odd_ids(tmp_path):
    c = ResultCache("t", {}, root=tmp_path)
    ids = ["img/with slash", "ok_id", "ünï"]
    out = map_cached(lambda part: [len(p) for p in part], ids, c, chunk=2, progress=False)
    assert out == {i: len(i) for i in ids}
    assert all(c.has(i) for i in ids)


def test_unreadable_cache_file(tmp_path):
    c = ResultCache("t", {}, root=tmp_path)
    c.save("a", 1)
    c._file("a").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="delete it"):
        c.load("a")


def _shape_check(n):
    def check(i, v):
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != (n,):
            return f"a value of shape {tuple(getattr(v, 'shape', ()))}, expected ({n},)"
        return None
    return check


def test_wrong_shape_entry_is_recomputed_not_returned(tmp_path):
    c = ResultCache("t", dict(S=10), root=tmp_path)
    c.save("a", torch.zeros(11))          # e.g. written by a run with another grid
    c.save("b", torch.ones(10))
    calls = []

    def fn(i):
        calls.append(i)
        return torch.full((10,), 2.0)
    with pytest.warns(UserWarning, match=r"cache file .*a\.pt \(example 'a'\) holds a value of shape "
                      r"\(11,\), expected \(10,\); it is not used and is recomputed"):
        out = map_cached(fn, ["a", "b"], c, progress=False, check=_shape_check(10))
    assert calls == ["a"] and out["a"].shape == (10,) and torch.equal(out["b"], torch.ones(10))
    assert torch.equal(c.load("a"), torch.full((10,), 2.0))  # the bad entry was replaced


def test_new_result_failing_the_check_is_never_cached(tmp_path):
    c = ResultCache("t", {}, root=tmp_path)
    with pytest.raises(RuntimeError, match=r"\(scores\): the new result for 'x' is a value of shape "
                       r"\(3,\), expected \(10,\)"):
        map_cached(lambda i: torch.zeros(3), ["x"], c, desc="scores", progress=False,
                   check=_shape_check(10))
    assert not c.has("x")


def test_unreadable_entry_is_recomputed_by_map_cached(tmp_path):
    c = ResultCache("t", {}, root=tmp_path)
    c.save("a", 1)
    c.path("a").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"a\.pt .*holds an unreadable file"):
        assert map_cached(lambda i: 5, ["a"], c, progress=False) == {"a": 5}
    assert c.load("a") == 5


def test_stale_tmp_files_are_removed(tmp_path):
    import os
    import subprocess
    import sys
    c = ResultCache("t", {}, root=tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = c.dir / f".a.pt.{dead}.0123abcd.tmp"
    live = c.dir / f".b.pt.{os.getpid()}.0123abcd.tmp"
    old = c.dir / "tmpk2j3h4.tmp"               # mkstemp name of the previous version
    for p in (stale, live, old):
        p.write_bytes(b"half a result")
    ResultCache("t", {}, root=tmp_path)
    assert not stale.exists() and not old.exists()
    assert live.exists()  # a writer that still runs keeps its file


def test_failed_write_leaves_no_tmp(tmp_path, monkeypatch):
    c = ResultCache("t", {}, root=tmp_path)

    def dies(value, f):
        f.write(b"partial")
        raise KeyboardInterrupt()
    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(KeyboardInterrupt):
        c.save("a", 1)
    assert not c.has("a") and list(c.dir.glob("*.tmp")) == [] and list(c.dir.glob(".*.tmp")) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    import os
    old = os.umask(umask)
    try:
        c = ResultCache("t", {"u": umask}, root=tmp_path)
        c.save("a", 1)
    finally:
        os.umask(old)
    assert c.path("a").stat().st_mode & 0o777 == mode
    assert (c.dir / "key.json").stat().st_mode & 0o777 == mode


def test_bad_cache_root_and_chunk(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OSError, match=r"cannot create the cache folder .*file.*set T2I_CACHE"):
        ResultCache("t", {}, root=f)
    with pytest.raises(ValueError, match=r"chunk must be a positive integer, got 0"):
        map_cached(lambda i: i, [1], None, chunk=0, progress=False)
