"""Issue 14 experiment: the demo's caption phase with name-swapped negative captions."""
import sys, tempfile, time, torch
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo_models import ARCHITECTURE
from focalsearch.models.tiny import save_tiny_clip
from focalsearch.train.data import ColorShapeSource
from focalsearch.train.loop import TrainOptions, train
names = sys.argv[1] == "names"
out = Path(sys.argv[2])
torch.set_num_threads(2)
started = time.perf_counter()
captions = ColorShapeSource("caption", ARCHITECTURE["image_size"], seed=1, name_negatives=names)
with tempfile.TemporaryDirectory() as scratch:
    init = save_tiny_clip(Path(scratch) / "init", captions.texts(), seed=0, vocab_size=1000, **ARCHITECTURE)
    train(str(init), out, captions, TrainOptions(objective="caption", steps=int(sys.argv[3]), batch_size=128, lr=5e-4, warmup=200, seed=0, device="cpu"), progress=False)
print("done", time.perf_counter() - started)
