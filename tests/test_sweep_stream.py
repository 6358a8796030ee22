"""The streamed sweep (stream.stream): the table it writes piece by piece, its crossovers, memory walls and kept rows
are those of the in-memory table (sweep.run and crossover.crossovers), whatever the pieces; two worker processes
write the same table; an interrupted sweep leaves no file behind."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xqsim import loading, stream, sweep
from xqsim.crossover import crossovers, memory_walls

TINY = Path(__file__).parent / "data" / "tiny_scenario.yaml"
KEYS = ["hardware", "model", "label", "batch", "context"]


@pytest.fixture(scope="module")
def grid():
    sc = loading.load_scenario(TINY)
    hws = [loading.load_hardware(h) for h in sc.hardware]
    models = [loading.load_model(m) for m in sc.models]
    return hws, models, sc.scheme_configs(), sorted(sc.batch), sc.contexts()


def plain(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in key order, categoricals as strings (a streamed table's categories list every scheme)."""
    df = df.astype({c: str for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)})
    return df.sort_values(KEYS, kind="stable").reset_index(drop=True)


def test_streamed_sweep_equals_the_table_in_memory(grid, tmp_path, monkeypatch):
    """Pieces of 20 rows split every (model, scheme) along batch and context (2 GPUs x 12 contexts = 24 rows a
    batch); the table (Parquet and CSV), crossovers, walls and the rows kept for plots are the in-memory ones."""
    hws, models, configs, batch, context = grid
    monkeypatch.setattr(stream, "CHUNK_ROWS", 20)
    assert len(stream._units(2, 2, len(configs), 3, 12)) == 2 * len(configs) * 3 * 2
    df = sweep.run(hws, models, configs, batch, context)
    keep_ctx = stream.thinned(context, most=4, near=(1000,))
    res = stream.stream(hws, models, configs, batch, context, tmp_path / "r.parquet", tmp_path / "r.csv",
                       keep_batches=(8,), keep_contexts=keep_ctx)
    assert res.rows == len(df) == 2 * 22 * 3 * 12
    pd.testing.assert_frame_equal(plain(pd.read_parquet(tmp_path / "r.parquet")), plain(df))
    csv = pd.read_csv(tmp_path / "r.csv", keep_default_na=False)
    assert list(csv.columns) == list(df.columns) and len(csv) == len(df)
    assert np.array_equal(plain(csv)["step_time_s"], plain(df)["step_time_s"])
    cr = crossovers(df)
    assert len(cr) > 100
    pd.testing.assert_frame_equal(res.crossovers.astype(str), cr.astype(str))
    pd.testing.assert_frame_equal(res.walls.astype(str), memory_walls(df).astype(str))
    kept = df[(df["batch"] == 8) & df["context"].isin(keep_ctx)]
    pd.testing.assert_frame_equal(plain(res.kept), plain(kept))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.parquet"]


def test_two_workers_write_the_same_table(grid, tmp_path, monkeypatch):
    """Workers are spawned, and like any spawned process import the caller's main module by its path; a test
    run's may be a Streamlit page an earlier test left there, so this one runs under a plain main module."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    hws, models, configs, batch, context = grid
    one = stream.stream(hws, models, configs, batch, context, tmp_path / "one.parquet")
    two = stream.stream(hws, models, configs, batch, context, tmp_path / "two.parquet", workers=2)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two.parquet"), pd.read_parquet(tmp_path / "one.parquet"))
    pd.testing.assert_frame_equal(two.crossovers, one.crossovers)


def test_an_interrupted_sweep_leaves_no_file(grid, tmp_path, monkeypatch):
    """A Ctrl-C after some pieces are written: neither the files nor their temporary names are left."""
    hws, models, configs, batch, context = grid
    monkeypatch.setattr(stream, "CHUNK_ROWS", 50)
    seen = []

    def interrupt(msg: str, rows: int) -> None:
        seen.append(rows)
        if rows >= 200:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream.stream(hws, models, configs, batch, context, tmp_path / "r.parquet", tmp_path / "r.csv",
                     on_step=interrupt)
    assert max(seen) >= 200 and list(tmp_path.iterdir()) == []


def test_thinned_keeps_the_ends_and_the_nearest_points():
    ctx = list(range(1000, 21000))
    kept = stream.thinned(ctx, most=512, near=(32768, 5000.4))
    assert len(kept) <= 514 and kept[0] == 1000 and kept[-1] == 20999 and 20999 in kept and 5000 in kept
    assert stream.thinned([16, 32, 64], most=512) == [16, 32, 64]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    """Every file a command writes goes through loading.write_atomic: interrupted halfway, the old file stands and
    no temporary one is left."""
    from xqsim import loading

    p = tmp_path / "crossovers.csv"
    p.write_text("old")

    def half(tmp: Path) -> None:
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loading.write_atomic(p, half)
    assert p.read_text() == "old" and [x.name for x in tmp_path.iterdir()] == ["crossovers.csv"]
    loading.write_atomic(p, lambda tmp: tmp.write_text("new"))
    assert p.read_text() == "new" and [x.name for x in tmp_path.iterdir()] == ["crossovers.csv"]
