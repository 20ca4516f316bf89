"""The HDF5 embedding store: schema, crash-safe append, resume, read, merge/compact.

Format 3 (this one): STORE is a directory, self-contained (see _layout):
`STORE/index.h5` is a small index; committed rows live in immutable shard
files in `STORE/parts/`. Plain h5py reads `h5py.File("STORE/index.h5")["embeddings"]`
etc.: the index holds HDF5 virtual datasets over the live rows of every
shard, named relative to it. A commit writes one new shard and then
atomically replaces the index, so adding rows costs O(new rows); replaced or
removed rows are tombstoned, small shards folded (see writer.py). Format-1/2
stores (a file, with STORE.parts/ beside it) are read as they are and
upgraded into a directory by the next writer. One writer at a time (an flock
on `STORE/lock`); readers never block and keep their snapshot. No
TensorFlow, no heads here.
"""

from embedstore.store._format import FORMAT, FORMAT_VERSION, StoreError, backbone_attrs
from embedstore.store._layout import INDEX, layout, parts_dir, quarantine_dir
from embedstore.store._lock import lock_path
from embedstore.store.backends import (
                                          BACKENDS,
                                          CompactResult,
                                          MergeResult,
                                          Reader,
                                          StoreInfo,
                                          VerifyResult,
                                          Writer,
                                          open_store,
                                          open_writer,
)
from embedstore.store.maintenance import (
                                          compact,
                                          copy_rows,
                                          merge,
                                          merge_stores,
                                          stored_backbone,
                                          verify,
)
from embedstore.store.reader import StoreReader, read_rows
from embedstore.store.writer import FOLD_ROWS, PendingRows, StoreWriter

__all__ = ["BACKENDS", "CompactResult", "FOLD_ROWS", "FORMAT", "FORMAT_VERSION", "INDEX",
           "MergeResult", "PendingRows", "Reader", "StoreError", "StoreInfo", "StoreReader",
           "StoreWriter", "VerifyResult", "Writer", "backbone_attrs", "compact", "copy_rows",
           "layout", "lock_path", "merge", "merge_stores", "open_store", "open_writer",
           "parts_dir", "quarantine_dir", "read_rows", "stored_backbone", "verify"]
