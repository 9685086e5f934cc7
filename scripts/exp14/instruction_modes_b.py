import sys, time, torch
from pathlib import Path
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/scripts")
from build_demo_models import ARCHITECTURE
from focalsearch.train.data import ColorShapeSource
from focalsearch.train.loop import TrainOptions, train
init, out, mode, steps, threads = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
t = time.perf_counter()
src = ColorShapeSource("instruction", ARCHITECTURE["image_size"], seed=2, recolor=0.5, phrasing_noise=0.5)
extra = {"full": {}, "noemb": {"freeze_token_embeddings": True}, "slow": {"text_lr_scale": 0.1}}[mode]
train(init, out, src, TrainOptions(objective="instruction", steps=steps, batch_size=128, lr=6e-4, warmup=200, seed=0, device="cpu",
      train_text=True, image_weight=0.5, **extra), progress=False)
print("done", time.perf_counter() - t, flush=True)
