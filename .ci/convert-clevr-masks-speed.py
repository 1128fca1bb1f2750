"""The figures README and `run.py convert-clevr-masks --help` cite: per record of full-size synthetic CLEVR-with-masks
records (tests/test_clevr_masks.py's `scene_record`, random-noise images, so PNGs are an upper bound), the masked
CRC-32C of its data and the whole conversion (GZIP stream, both checksums, parsing, two PNGs), and the PNG sizes.
Run from the repository root: python .ci/convert-clevr-masks-speed.py"""
import gzip
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

root = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(root), str(root / "tests")]

from envs.clevr_masks import convert  # noqa: E402
from envs.tfrecord import masked_crc32c  # noqa: E402
from test_clevr_masks import scene_record  # noqa: E402

n = 40
records = [scene_record(k % 7 + 3, k)[0] for k in range(4)]
t = time.perf_counter()
for r in records * 10:
    masked_crc32c(r)
crc_ms = (time.perf_counter() - t) / 40 * 1000
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "release.tfrecords"
    with gzip.open(path, "wb") as f:
        for i in range(n):
            r = records[i % 4]
            head = struct.pack("<Q", len(r))
            f.write(head + struct.pack("<I", masked_crc32c(head)) + r + struct.pack("<I", masked_crc32c(r)))
    t = time.perf_counter()
    convert(path, Path(tmp) / "out", train_scenes=n // 2)
    per = (time.perf_counter() - t) / n
    png = sum(p.stat().st_size for p in (Path(tmp) / "out" / "images").rglob("*.png")) / n
    shutil.rmtree(Path(tmp) / "out")
print(f"record {len(records[0]) / 1e6:.1f} MB: masked CRC-32C {crc_ms:.2f} ms; conversion {per * 1000:.1f} ms per record "
      f"(100k records: {per * 1e5 / 3600:.2f} h); image PNG {png / 1e3:.0f} KB (100k: {png * 1e5 / 1e9:.0f} GB)")
