"""A TFDS builder shipped with ftjax: local JSONL/JSON files -> ArrayRecord, written once, then read
as a random-access data source (no TensorFlow needed: tfds + array_record).

Each example keeps the record's JSON text and its original `file:line`, so validation errors found when
reading still name the user's file. Use:

    prepare_jsonl({"train": ["a.jsonl"], "validation": ["b.jsonl"]}, data_dir="/data/tfds")
    # then: data.tfds_name=jsonl_records data.tfds_data_dir=/data/tfds
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Sequence

import tensorflow_datasets as tfds

from ftjax.data.fingerprint import file_fingerprint
from ftjax.data.records import iter_json

NAME = "jsonl_records"
_SOURCES_FILE = "ftjax_sources.json"


class JsonlRecords(tfds.core.GeneratorBasedBuilder):
    """Records of local JSON Lines / JSON array files, one example per record, in file order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Raw JSON text of each record and its file:line."}

    def __init__(self, *, files: Mapping[str, Sequence[str]] | None = None, **kwargs):
        self._files = {k: list(v) for k, v in (files or {}).items()}
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__, disable_shuffling=True,
            features=tfds.features.FeaturesDict({"json": tfds.features.Text(), "source": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        if not self._files:
            raise ValueError("JsonlRecords needs files={split: [paths]} to be prepared")
        return {split: self._generate_examples(paths) for split, paths in self._files.items()}

    def _generate_examples(self, paths: Sequence[str]):
        for path in paths:
            for line, obj in iter_json(path):
                source = f"{path}:{line}"
                yield source, {"json": json.dumps(obj, ensure_ascii=False), "source": source}


def prepare_jsonl(files: Mapping[str, Sequence[str]], data_dir: str) -> str:
    """Write the files as the `jsonl_records` TFDS dataset under data_dir (again only if they changed);
    returns the dataset's folder."""
    files = {split: [os.path.abspath(p) for p in paths] for split, paths in files.items()}
    sources = {split: [[p, file_fingerprint(p)] for p in paths] for split, paths in files.items()}
    builder = JsonlRecords(files=files, data_dir=data_dir, file_format="array_record")
    marker = os.path.join(builder.data_dir, _SOURCES_FILE)
    prepared = os.path.exists(os.path.join(builder.data_dir, "dataset_info.json"))
    if prepared:
        try:
            with open(marker) as f:
                same = json.load(f) == sources
        except (OSError, ValueError):
            same = False
        if same:
            return builder.data_dir
        shutil.rmtree(builder.data_dir)
        builder = JsonlRecords(files=files, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    with open(marker, "w") as f:
        json.dump(sources, f)
    return builder.data_dir
