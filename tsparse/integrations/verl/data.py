"""ViTAR-16K-format JSON -> the parquet verl's RL dataset (``RLHFDataset``) reads.

``python -m tsparse.integrations.verl.data --input train.json --output data/verl [--stream
localization] [--method configs/dualstream.yaml] [--split train] [--data-source vitar16k]``

One row per question, the columns ``verl/utils/dataset/rl_dataset.py`` uses:

* ``prompt``: the stream's chat (``configs/dualstream.yaml`` ``prompts.<stream>``: system +
  user template with ``{question}``) as ``[{"role", "content": str}]``, each image an
  ``<image>`` placeholder in the user text, in order (verl splits the text on it);
* ``images``: ``[{"bytes": <PNG>}]`` - the images embedded, so the parquet is self-contained;
* ``data_source``, ``ability`` (``"medical_vqa"``);
* ``reward_model``: ``{"style": "rule", "ground_truth": <JSON {"answer", "bbox", "options"}>}``
  (the composite reward, ``tsparse.dualstream.reward_fn.compute_score``, parses it);
* ``extra_info``: ``{"index", "split", "id", "stream", "question", "answer", "bbox" (JSON)}``
  - ``stream`` selects the reward's stream.

Writes ``<output>/<split>_<stream>.parquet`` and prints the path and row count. Errors name the
record (the loader's checks) or the argument.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ...dualstream.config import MethodConfig, load_method_config
from ...dualstream.data import IMAGE_PLACEHOLDER, VQASample, build_messages, load_images, load_vitar_json
from ...dualstream.format import STREAMS

__all__ = ["sample_row", "convert", "main"]


def _text_messages(sample: VQASample, method: MethodConfig, stream: str) -> list[dict]:
    """The stream's chat with string contents and ``<image>`` placeholders (verl's format)."""
    out = []
    for msg in build_messages(sample, method.prompts.for_stream(stream)):
        parts = []
        for part in msg["content"]:
            if part["type"] == "image":
                parts.append(IMAGE_PLACEHOLDER)
            elif part["type"] == "text":
                parts.append(part["text"])
            else:  # pragma: no cover - build_messages writes only these two
                raise ValueError(f"unexpected content type {part['type']!r}")
        out.append({"role": msg["role"], "content": "".join(parts)})
    return out


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_row(sample: VQASample, index: int, *, method: MethodConfig, stream: str, split: str,
               data_source: str) -> dict:
    """One parquet row (a plain dict) for ``sample``."""
    if stream not in STREAMS:
        raise ValueError(f"`stream` must be one of {list(STREAMS)}, got {stream!r}")
    gt = {"answer": sample.answer, "bbox": [list(b) for b in sample.boxes], "options": dict(sample.options)}
    return {
        "data_source": data_source,
        "prompt": _text_messages(sample, method, stream),
        "images": [{"bytes": _png(im)} for im in load_images(sample)],
        "ability": "medical_vqa",
        "reward_model": {"style": "rule", "ground_truth": json.dumps(gt)},
        "extra_info": {
            "index": int(index),
            "split": split,
            "id": sample.id,
            "stream": stream,
            "question": sample.question,
            "answer": sample.answer,
            "bbox": json.dumps(gt["bbox"]),
        },
    }


def convert(
    input_path,
    output_dir,
    *,
    stream: str = "localization",
    method: Optional[MethodConfig] = None,
    split: str = "train",
    data_source: str = "vitar16k",
    limit: Optional[int] = None,
) -> Path:
    """Converts a ViTAR-16K-format file; returns the parquet path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    method = method or load_method_config()
    samples = load_vitar_json(input_path, limit=limit)
    if not samples:
        raise ValueError(f"`input_path` {str(input_path)!r} holds no records")
    rows = [sample_row(s, i, method=method, stream=stream, split=split, data_source=data_source)
            for i, s in enumerate(samples)]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}_{stream}.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tsparse.integrations.verl.data", description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", required=True, help="ViTAR-16K-format JSON (or .jsonl); image paths relative to it")
    ap.add_argument("--output", required=True, help="output folder")
    ap.add_argument("--stream", default="localization", choices=list(STREAMS), help="whose prompt template to use")
    ap.add_argument("--method", default=None, help="method config (default configs/dualstream.yaml)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--data-source", default="vitar16k")
    ap.add_argument("--limit", type=int, default=None, help="convert at most this many records")
    args = ap.parse_args(argv)
    method = load_method_config(args.method) if args.method else None
    path = convert(args.input, args.output, stream=args.stream, method=method, split=args.split,
                   data_source=args.data_source, limit=args.limit)
    import pyarrow.parquet as pq

    print(f"{path}: {pq.read_metadata(path).num_rows} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
