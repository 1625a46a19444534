"""The benchmarks still run against the scripts' functions (tiny sizes; no timing is asserted)."""
import sys

from conftest import ROOT, jpeg_folder

sys.path.insert(0, str(ROOT / "benchmarks"))
import augment_speed  # noqa: E402
import train_speed  # noqa: E402

def test_train_speed_times_a_step_and_an_evaluation_of_every_script():
    rows = train_speed.main(["--device", "cpu", "--steps", "1", "--warmup", "1", "--batch-size", "8",
                             "--img-size", "16", "--eval-train", "32", "--eval-test", "16"])
    assert [row["script"] for row in rows] == train_speed.SCRIPTS
    assert all(row["images_per_s"] > 0 and row["evaluation_s"] > 0 for row in rows)

def test_augment_speed_compares_the_batched_and_the_pil_pipeline(tmp_path):
    for images in ([], ["--data-dir", str(jpeg_folder(tmp_path / "images"))]):  # random pixels, real images
        speeds = augment_speed.main(["--batch-size", "16", "--img-size", "16", "--repeats", "2", *images])
        assert min(speeds) > 0
