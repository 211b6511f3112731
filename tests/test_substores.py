"""jaxckpt.substores: a large save spreads its arrays over several OCDBT stores, and the checkpoint stays one
that plain Orbax and jaxckpt.fastread read back bit for bit (benchmarks/README.md §1e, thirteenth session)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mplib
import pytest
from orbax.checkpoint._src.serialization import ocdbt_process_spec
from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
from test_d2h import _save, abstract_of, assert_install_keeps, assert_same_arrays, named_arrays, orbax_read

from jaxckpt import fastread, substores
from jaxckpt.checkpoint import make_manager


def test_one_store_up_to_store_bytes_then_one_per_store_bytes_up_to_the_cap() -> None:
    gib = 1 << 30
    assert [substores.stores_for(n, gib) for n in (0, 1, gib, gib + 1, 4 * gib, 4 * gib + 1)] == [1, 1, 1, 2, 4, 5]
    assert substores.stores_for(100 * gib, gib) == substores.MAX_STORES


def test_assign_puts_the_largest_first_each_into_the_emptiest_store() -> None:
    names, sizes = ["a", "b", "c", "d", "e", "f"], [50, 40, 30, 20, 10, 10]
    stores = substores.assign(names, sizes, store_bytes=60)  # 160 bytes: 3 stores
    assert stores == {"a": 0, "b": 1, "c": 2, "d": 2, "e": 1, "f": 0}
    loads = [sum(s for n, s in zip(names, sizes, strict=True) if stores[n] == k) for k in range(3)]
    assert sorted(loads) == [50, 50, 60]
    assert set(substores.assign(names, sizes, store_bytes=1000).values()) == {0}


def test_store_zero_is_orbaxs_own_directory_the_others_names_orbax_accepts() -> None:
    assert substores.process_id(3, 0) == 3 and substores.process_id(None, 2) is None
    name = str(ocdbt_process_spec.OcdbtProcessSpec(process_id=str(substores.process_id(3, 2))))
    assert name == "ocdbt.process_3s2" and name.startswith(ocdbt_process_spec.PROCESS_PREFIX)
    assert ocdbt_process_spec.OcdbtProcessSpec.parse(name).process_id == "3s2"


def test_a_save_over_several_stores_reads_back_bit_for_bit(tmp_path: Path) -> None:
    """Arrays of 8-device shardings in 4 stores: plain Orbax and fastread give every byte and sharding back."""
    tree = named_arrays()
    total = sum(x.nbytes for x in tree.values())
    _save(make_manager(tmp_path / "ck", store_bytes=total // 4 + 1), tree)
    item = tmp_path / "ck" / "1" / "state"
    stores = mplib.ocdbt_stores(item)
    assert stores == ["ocdbt.process_0", "ocdbt.process_0s1", "ocdbt.process_0s2", "ocdbt.process_0s3"]
    assert all(any((item / s / "d").iterdir()) for s in stores), "a store holds no data"

    assert_same_arrays(orbax_read(item, tree), tree, "orbax")
    assert_same_arrays(fastread.restore(item, abstract_of(tree)), tree, "fastread")


def test_a_save_up_to_store_bytes_keeps_orbaxs_one_store(tmp_path: Path) -> None:
    tree = named_arrays()
    _save(make_manager(tmp_path / "ck"), tree)
    assert mplib.ocdbt_stores(tmp_path / "ck" / "1" / "state") == ["ocdbt.process_0"]


def test_installed_over_this_orbax() -> None:
    assert substores.install() and hasattr(ts_utils.build_array_write_spec, "jaxckpt_orbax")


def test_another_orbax_keeps_one_store(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def build_array_write_spec(info: Any, arg: Any = None, *, process_id: Any = None) -> Any:
        return None

    assert_install_keeps(substores, ts_utils, "build_array_write_spec", build_array_write_spec, monkeypatch, caplog,
                         "process_index", "one OCDBT store")
