import pandas as pd
import pytest

from lepton_tasks.core.errors import ShardError
from lepton_tasks.stages.shard import held_out_mask, shard
from tests.conftest import MNIST_SPEC


def _shard(ingested, out, client, n=3, seed=1):
    return shard(ingested, out, n, 0.2, seed, MNIST_SPEC.spec, client)


@pytest.fixture
def parts(tmp_path):
    from tests.conftest import mnist_frame

    frame = mnist_frame(900)
    paths = []
    for i, chunk in enumerate([frame.iloc[:400], frame.iloc[400:]]):  # two partitions
        path = tmp_path / f"part-{i}.parquet"
        chunk.to_parquet(path, index=False)
        paths.append(str(path))
    return paths


def test_shards_partition_the_rows_stratified(parts, tmp_path, dask_client):
    manifest = _shard(parts, tmp_path / "shard", dask_client)
    frames = {s.name: pd.concat(pd.read_parquet(f) for f in s.files) for s in [*manifest.shards, manifest.eval]}
    assert sum(len(f) for f in frames.values()) == 900
    assert manifest.eval.rows == len(frames["eval"]) and 140 < manifest.eval.rows < 220
    everything = pd.concat(frames.values())
    assert not everything.duplicated().any()
    for label in map(str, range(10)):  # round-robin per label: shard counts differ by at most one
        counts = [s.label_histogram.get(label, 0) for s in manifest.shards]
        assert max(counts) - min(counts) <= 1


def test_sharding_is_deterministic_given_the_seed(parts, tmp_path, dask_client):
    first = _shard(parts, tmp_path / "a", dask_client)
    again = _shard(parts, tmp_path / "b", dask_client)
    other = _shard(parts, tmp_path / "c", dask_client, seed=2)
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in again.shards]
    assert [s.sha256 for s in first.shards] != [s.sha256 for s in other.shards]


def test_the_same_rows_in_other_files_and_row_groups_make_the_same_shards(tmp_path, dask_client):
    """Rows are dealt by their global row number, which the partitions' sizes give: from the Parquet footers
    (no pass over the data), whatever the files and row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lepton_tasks.core.storage import parquet_partitions
    from tests.conftest import mnist_frame

    table = pa.Table.from_pandas(mnist_frame(900), preserve_index=False)
    layouts = {"one": [(0, 900, 900)], "three": [(0, 250, 100), (250, 700, 64), (700, 900, 1000)]}
    made = {}
    for name, files in layouts.items():
        paths = []
        for index, (start, stop, row_group) in enumerate(files):
            paths.append(str(tmp_path / f"{name}-{index}.parquet"))
            pq.write_table(table.slice(start, stop - start), paths[-1], row_group_size=row_group)
        planned = parquet_partitions(paths, max_bytes=40_000)  # two row groups a partition, some split
        assert [p.rows for p in planned] == [p.read().num_rows for p in planned]
        assert [p.start for p in planned] == [sum(q.rows for q in planned[:i]) for i in range(len(planned))]
        made[name] = _shard(paths, tmp_path / name, dask_client)

    def rows(manifest):
        return [pd.concat(pd.read_parquet(f) for f in s.files).sort_values(["x_00", "x_01"]).to_numpy().tobytes()
                for s in [*manifest.shards, manifest.eval]]

    assert rows(made["one"]) == rows(made["three"])


def test_a_selection_split_comes_from_the_training_side_and_leaves_the_held_out_rows_as_they_were(parts, tmp_path,
                                                                                                  dask_client):
    plain = _shard(parts, tmp_path / "plain", dask_client)
    with_select = shard(parts, tmp_path / "select", 3, 0.2, 1, MNIST_SPEC.spec, dask_client, select_fraction=0.1)
    assert plain.select is None and with_select.eval.sha256 == plain.eval.sha256  # the gate's rows: untouched

    def frame(info):
        return pd.concat(pd.read_parquet(f) for f in info.files)

    trained = pd.concat(frame(s) for s in with_select.shards)
    selected = frame(with_select.select)
    assert 30 <= len(selected) <= 115  # about a tenth of the 720 training-side rows
    assert len(trained) + len(selected) == sum(s.rows for s in plain.shards)
    assert selected.merge(trained).empty and selected.merge(frame(with_select.eval)).empty


def test_held_out_mask_is_seeded_and_near_the_fraction():
    import numpy as np

    rows = np.arange(100_000)
    mask = held_out_mask(rows, 3, 0.2)
    assert abs(mask.mean() - 0.2) < 0.01
    assert (held_out_mask(rows, 3, 0.2) == mask).all() and (held_out_mask(rows, 4, 0.2) != mask).any()


def test_more_shards_than_rows_is_a_clear_error(tmp_path, dask_client):
    from tests.conftest import mnist_frame

    path = tmp_path / "p.parquet"
    mnist_frame(10).to_parquet(path, index=False)
    with pytest.raises(ShardError, match="num_shards"):
        _shard([str(path)], tmp_path / "shard", dask_client, n=50)
    assert not (tmp_path / "shard").exists()


def _sited(tmp_path, sites) -> list[str]:
    """900 MNIST-1D rows in two files with a `site` column (not a feature) chosen by `sites(frame)`."""
    from tests.conftest import mnist_frame

    frame = mnist_frame(900)
    frame["site"] = sites(frame)
    paths = []
    for i, chunk in enumerate([frame.iloc[:500], frame.iloc[500:]]):
        path = tmp_path / f"sited-{i}.parquet"
        chunk.to_parquet(path, index=False)
        paths.append(str(path))
    return paths


def test_shard_by_gives_one_shard_per_value_with_natural_sizes_and_label_mix(tmp_path, dask_client):
    import numpy as np

    def by_label(frame):  # label-skewed sites, and some rows with no site
        site = np.where(frame["label"] < 3, "north", np.where(frame["label"] < 7, "south", "west")).astype(object)
        site[::50] = None
        return site

    parts = _sited(tmp_path, by_label)
    manifest = shard(parts, tmp_path / "shard", 8, 0.2, 1, MNIST_SPEC.spec, dask_client, shard_by="site")
    assert [s.keys for s in manifest.shards] == [["__null__"], ["north"], ["south"], ["west"]]
    assert manifest.shard_by == "site" and manifest.eval.keys is None
    north, south, west = ({int(k) for k in s.label_histogram} for s in manifest.shards[1:])
    assert north <= {0, 1, 2} and south <= {3, 4, 5, 6} and west <= {7, 8, 9}  # no stratification
    assert sum(s.rows for s in manifest.shards) + manifest.eval.rows == 900
    assert len({s.rows for s in manifest.shards}) == 4  # natural sizes
    written = pd.read_parquet(manifest.shards[1].files[0])
    assert "site" not in written.columns  # not a feature: the shards do not carry it
    again = shard(parts, tmp_path / "again", 8, 0.2, 1, MNIST_SPEC.spec, dask_client, shard_by="site")
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in manifest.shards]


def test_shard_by_hashes_many_values_into_num_shards_and_names_a_missing_column(tmp_path, dask_client):
    import numpy as np

    from lepton_tasks.stages.shard import stable_bucket

    parts = _sited(tmp_path, lambda frame: np.array([f"site-{i % 20:02d}" for i in range(len(frame))]))
    manifest = shard(parts, tmp_path / "shard", 3, 0.2, 1, MNIST_SPEC.spec, dask_client, shard_by="site")
    assert len(manifest.shards) == 3
    for index, info in enumerate(manifest.shards):
        assert info.keys and all(stable_bucket(key, 3) == index for key in info.keys)
    assert sorted(k for s in manifest.shards for k in s.keys) == [f"site-{i:02d}" for i in range(20)]
    with pytest.raises(ShardError, match="'shard_by' names column 'region'"):
        shard(parts, tmp_path / "missing", 3, 0.2, 1, MNIST_SPEC.spec, dask_client, shard_by="region")
    assert not (tmp_path / "missing").exists()
