import sys, torch, glob
from configs import load_config
from models.build import load_trained_model
from losses import build_train_scheduler
from train.data import build_dataset
from tryon_data import colour_error, masked_mean_colour
from torch.utils.data import default_collate
from models.sampling import sample_tryon, build_sample_scheduler
from models import build_model
def mean_colour_err(a, b, m):
    a=(a+1)/2; b=(b+1)/2
    ma=(a*m).sum((2,3))/m.sum((2,3)); mb=(b*m).sum((2,3))/m.sum((2,3))
    return (ma-mb).abs().mean(1)
run = sys.argv[1]
ck = sorted(glob.glob(f"{run}/checkpoints/checkpoint-*"))[-1]
cfg = load_config(files=[f"{ck}/config.yaml"])
ds = build_dataset(cfg.data, "val"); tr = build_dataset(cfg.data, "train")
b = default_collate([ds[i] for i in range(16)])
ts = build_train_scheduler(1000, cfg.diffusion.beta_schedule, cfg.diffusion.prediction_type)
mean = masked_mean_colour(tr, num=512)
blind = b["agnostic"]*(1-b["mask"]) + mean.view(1,3,1,1)*b["mask"]
for name, m in [("untrained", build_model(cfg.model)), ("trained", load_trained_model(cfg.model, f"{ck}/model"))]:
    out = sample_tryon(m.eval(), b, build_sample_scheduler(ts), 25, 1.0, torch.Generator().manual_seed(0))
    print(name, "pixel", round(float(colour_error(out,b["person"],b["mask"]).mean()),4), "meancol", round(float(mean_colour_err(out,b["person"],b["mask"]).mean()),4))
print("blind pixel", round(float(colour_error(blind,b["person"],b["mask"]).mean()),4), "meancol", round(float(mean_colour_err(blind,b["person"],b["mask"]).mean()),4))
