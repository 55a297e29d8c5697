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
