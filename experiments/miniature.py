"""The paper in miniature: does restoring reports make a better radiograph encoder? (Tables 2 and 4)

Pre-trains the tiny preset on the same synthetic records, with the same budget and seed, under each
ablation of Table 4 and the max-pooling fusion of Table 5a; fine-tunes each encoder, and one from
scratch, on 1%, 10% and 100% of the synthetic training labels over several seeds; and scores every run
on one fixed held-out test set (mean AUC over the six findings). It also checks the fusion: how well each
pre-trained model restores the report words that only the radiograph can tell (side, size, zone,
presence) from its radiograph, from noise in its place, and from another report's radiograph.

    python experiments/miniature.py            # 3 seeds: 87 minutes on a 2-core CPU (measured, with LP-FT)
    python experiments/miniature.py --quick    # 1 seed, fewer records and steps: about 9 minutes

    python experiments/miniature.py --check out/ckpt.pt   # the fusion check of any train.py checkpoint

Writes experiments/miniature.json (variant -> label ratio -> per-seed test mean AUCs),
experiments/miniature_checks.json (the fusion check, settings, timings), experiments/miniature.md (the
tables) and experiments/miniature.png (the plot; needs matplotlib, experiments/requirements.txt). The
runs themselves go to --runs (checkpoints, fine-tuning logs); a run found there finished is reused, a
stopped pre-training resumes, so an interrupted experiment picks up where it stopped.
"""
import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checks  # noqa: E402
import data  # noqa: E402
import finetune  # noqa: E402
import finetune_data  # noqa: E402
import metrics  # noqa: E402
import recipes  # noqa: E402
import train  # noqa: E402
from machinery import checkpoints  # noqa: E402
from machinery.run import SCRIPTS, Run  # noqa: E402
from mrm import MRM, MRMConfig  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Table 4's rows (and Table 5a's GMP): TrainConfig fields that differ from the full model. `scratch`
# has no pre-training: its encoder starts from random weights.
VARIANTS = {
    "mrm": {},
    "no_mlm": {"mlm_weight": 0.0},            # L_R removed: image restoration (with super-resolution) only
    "no_sr": {"super_resolution": False},     # restore the low-res input patches instead of the 2x ones
    "no_mim": {"mim_weight": 0.0},            # L_I removed: report restoration only
    "gmp": {"fusion": "gmp"},                 # max instead of average pooling of the image feature
    "scratch": None,
}
RATIOS = (0.01, 0.1, 1.0)

@dataclass
class MiniConfig:
    # pre-training (the same for every variant)
    pretrain_records: int = 2048
    pretrain_epochs: int = 16
    blr: float = 1.5e-2              # 3x the tiny demo's: the report loss falls to ~0.4 nats instead of ~1.6
    hflip: bool = False              # a mirrored radiograph contradicts its report's 'left'/'right'
    fusion_tokens: str = "visible"   # the paper's fusion (train.py --fusion_tokens)
    # fine-tuning (finetune.py's classification recipe on the synthetic findings)
    finetune_records: int = 5000     # the 100% training pool: 1% is 50 labelled radiographs
    val_records: int = 500
    test_records: int = 2000
    steps: tuple = (50, 120, 250)    # optimizer steps of 32 at 1%, 10%, 100% of the labels
    lr: float = 0.1                  # SGD (finetune.py); 0.1 and 0.3 tied on validation
    min_crop: float = 0.8            # training crops keep >= 80% of the film: 0.08 (released) left every run near
                                     # chance on validation
    head_init: str = "probe"         # LP-FT (finetune.py --head_init probe): from a near-0 head, 50-250 steps landed
                                     # 5-21 points below a linear probe of the same encoder
    seeds: int = 3
    check_records: int = 500         # held-out reports for the fusion check
    variants: tuple = tuple(VARIANTS)


QUICK = dict(pretrain_records=1024, pretrain_epochs=5, finetune_records=2000, val_records=300, test_records=1000,
             steps=(30, 60, 100), seeds=1, check_records=200)


def pretrain(variant: str, cfg: MiniConfig, runs: str) -> str:
    """Pre-train one variant with train.py (or reuse/resume its run in runs/). Returns its ckpt.pt."""
    out = os.path.join(runs, variant, "pretrain")
    path = os.path.join(out, "ckpt.pt")
    tc = train.TrainConfig(out=out, num_records=cfg.pretrain_records, epochs=cfg.pretrain_epochs, warmup_epochs=1,
                           blr=cfg.blr, hflip=cfg.hflip, fusion_tokens=cfg.fusion_tokens, num_workers=1,
                           fusion_check=0,  # run below, on more records, with the twin split
                           **VARIANTS[variant])
    if os.path.exists(path):  # finished or stopped in an earlier experiment: only with the same settings
        ckpt = checkpoints.load_checkpoint(path)
        changed = {k: (ckpt["config"].get(k), v) for k, v in asdict(recipes.fill_pretraining(tc)).items()
                   if k not in SCRIPTS["train.py"]["may_change"] and ckpt["config"].get(k) != v}
        if changed:
            raise ValueError(f"{path}: pre-trained with other settings {changed}; use another --runs folder")
        if ckpt["epoch"] >= cfg.pretrain_epochs:
            print(f"{variant}: pre-trained already ({path})")
            return path
        tc.resume = path
        print(f"{variant}: resuming pre-training at epoch {ckpt['epoch']}")
    else:  # stopped before its first checkpoint (or never run): start again, replacing what it left
        tc.overwrite = True
    print(f"\n== pre-training {variant} ==")
    run = Run("train.py")  # train.py's settings, resolved and checked as its command line is
    flags = [f"--{k}" if v is True else f"--no-{k}" if v is False else f"--{k}={v}"
             for k, v in asdict(tc).items() if v is not None]
    train.train(*train.resolve(flags, run), run)
    return path


def finetune_runs(variant: str, init: str, cfg: MiniConfig, runs: str, rendered: dict, bar) -> dict:
    """Fine-tune one encoder at each label ratio and seed. Returns {ratio: [test mean AUC per seed]}."""
    out = {}
    for ratio, steps in zip(RATIOS, cfg.steps):
        out[str(ratio)] = []
        for seed in range(cfg.seeds):
            run_dir = os.path.join(runs, variant, f"finetune_{ratio}_seed{seed}")
            done = os.path.join(run_dir, "results.json")
            if os.path.exists(done):  # finished in an earlier, interrupted experiment
                with open(done) as f:
                    results = json.load(f)
            else:
                fc = finetune.FinetuneConfig(
                    init=init, num_records=cfg.finetune_records, num_val=cfg.val_records,
                    num_test=cfg.test_records, label_fraction=ratio, steps=steps, warmup_steps=max(1, steps // 15),
                    lr=cfg.lr, min_crop=cfg.min_crop, head_init=cfg.head_init, batch_size=32,
                    optimizer="sgd", hflip=True, drop_path=0.1,  # the released recipe's, as the table ran
                    eval_every=max(1, steps // 5), num_workers=0, out=run_dir, seed=seed,
                    resume=True)  # an interrupted fine-tuning continues from its last.pt
                results = finetune.finetune(fc, rendered)
                for lr_dir in os.listdir(run_dir):  # the weights are not needed again: 54 runs would keep ~9 GB
                    for name in ("best.pt", "last.pt"):
                        path = os.path.join(run_dir, lr_dir, name)
                        if os.path.isfile(path):
                            os.remove(path)
            out[str(ratio)].append(results["test_auc_mean"])
            bar.update()
            bar.set_postfix(variant=variant, ratio=ratio, seed=seed, auc=f"{results['test_auc_mean']:.3f}")
    return out


def load_model(path: str) -> tuple[MRM, dict]:
    """A train.py checkpoint's whole model (eval mode) and the checkpoint."""
    ckpt = checkpoints.load_checkpoint(path)
    model = MRM(MRMConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def check(path: str, first: int, n: int) -> tuple[dict | None, float]:
    """checks.py's fusion check (None without a report decoder) and pooled spread of one checkpoint, on
    held-out records first..first+n-1."""
    model, ckpt = load_model(path)
    films, reports = checks.held_out(first, n, 2 * model.cfg.img_size)
    spread = checks.pooled_spread(model.encoder, model.prepare_images, films)
    if model.report_decoder is None:
        return None, spread
    return checks.fusion_check(model, Tokenizer.from_str(ckpt["tokenizer"]), films, reports), spread


def probe_splits(cfg: "MiniConfig", rendered: dict) -> tuple[dict, dict]:
    """The fine-tuning runs' films (train, val, test), shared with them through `rendered`, as whole films at
    128 px, and their labels."""
    films, labels = {}, {}
    first = finetune_data.SYNTH_START
    for split, n in (("train", cfg.finetune_records), ("val", cfg.val_records), ("test", cfg.test_records)):
        key = (first, n, 128, ())  # the key finetune_data.build_splits uses for the tiny preset's 128-px renders
        if key not in rendered:
            rendered[key] = finetune_data.SyntheticFilms(first, n, 128)
        source = rendered[key]
        films[split] = np.stack([data.full_view(source.load(i), 128) for i in range(n)])
        labels[split] = source.labels
        first += n
    return films, labels


def probe(init: str, cfg: "MiniConfig", films: dict, labels: dict) -> dict:
    """A linear probe of the encoder of `init` ('none': a random tiny encoder) at each label ratio and seed,
    on the label subsets the fine-tuning runs use: {ratio: [test mean AUC per seed]}."""
    if init == "none":
        torch.manual_seed(0)
        model = MRM(MRMConfig.from_preset("tiny"))
    else:
        model = load_model(init)[0]
    features = {k: checks.pooled_features(model.encoder, model.prepare_images, v) for k, v in films.items()}
    out = {}
    for ratio in RATIOS:
        out[str(ratio)] = []
        for seed in range(cfg.seeds):
            keep = finetune_data.label_subset(len(labels["train"]), ratio, seed) if ratio < 1 else slice(None)
            result = metrics.linear_probe({**features, "train": features["train"][keep]},
                                          {**labels, "train": labels["train"][keep]})
            out[str(ratio)].append(result["test_auc_mean"])
    return out


def table(results: dict) -> str:
    """Table 4's layout: mean test AUC x 100 +- std over seeds, per label ratio."""
    head = "| variant | " + " | ".join(f"{round(r * 100)}%" for r in RATIOS) + " |"
    lines = [head, "|" + " --- |" * (len(RATIOS) + 1)]
    for variant, by_ratio in results.items():
        cells = []
        for r in RATIOS:
            v = np.array(by_ratio[str(r)], dtype=float) * 100
            cells.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) > 1 else f"{v.mean():.1f}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fusion_table(found: dict) -> str:
    """Per variant: restored-word accuracy from the film, from noise and from another report's film, per word
    group (checks.GROUPS)."""
    lines = ["| variant | input | " + " | ".join(checks.GROUPS) + " |", "|" + " --- |" * (len(checks.GROUPS) + 2)]
    for variant, c in found.items():
        for condition in checks.CONDITIONS:
            lines.append(f"| {variant} | {condition} | " + " | ".join(f"{c[g][condition]:.3f}" for g in checks.GROUPS)
                         + " |")
    if found:
        c = next(iter(found.values()))
        lines.append("| words scored | | " + " | ".join(str(c[g]["count"]) for g in checks.GROUPS) + " |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install -r experiments/requirements.txt)")
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for k, (variant, by_ratio) in enumerate(results.items()):
        v = [np.array(by_ratio[str(r)], dtype=float) for r in RATIOS]
        x = [r * (1 + 0.04 * (k - len(results) / 2)) for r in RATIOS]  # a small offset keeps error bars apart
        ax.errorbar(x, [a.mean() for a in v], yerr=[a.std() for a in v], marker="o", capsize=3, label=variant,
                    linestyle="--" if variant == "scratch" else "-")
    ax.set_xscale("log")
    ax.set_xticks(RATIOS, [f"{round(r * 100)}%" for r in RATIOS])
    ax.set_xlabel("share of the training labels")
    ax.set_ylabel("test mean AUC (6 findings)")
    ax.set_title("MRM in miniature: tiny encoder, synthetic radiographs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return True


def write_atomic(path: str, text: str):
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)


def run(cfg: MiniConfig, runs: str, results_dir: str, name: str = "miniature", command: str = "") -> dict:
    """The whole experiment; writes results_dir/<name>.json, <name>_checks.json, <name>.md, <name>.png.
    Returns the results (variant -> ratio -> per-seed test mean AUCs)."""
    torch.manual_seed(0)
    start = time.time()

    # 1. pre-training: the same records, budget and seed for every variant
    inits, timings = {}, {}
    for variant in cfg.variants:
        t = time.time()
        inits[variant] = "none" if VARIANTS[variant] is None else pretrain(variant, cfg, runs)
        timings[f"pretrain {variant}"] = round(time.time() - t)

    # 2. the fusion check on held-out reports, and the pooled feature's spread
    found, spread = {}, {}
    for variant, init in inits.items():
        if init == "none":
            continue
        c, spread[variant] = check(init, checks.CHECK_START, cfg.check_records)
        if c is not None:
            found[variant] = c
            print(f"{variant}: {checks.summary(c)}")

    # 3. fine-tuning and a linear probe: every encoder, every label ratio, every seed, one fixed test set
    rendered, results, probes = {}, {}, {}
    t = time.time()
    films, labels = probe_splits(cfg, rendered)
    for variant, init in inits.items():
        probes[variant] = probe(init, cfg, films, labels)
    timings["linear probes (all)"] = round(time.time() - t)
    t = time.time()
    with tqdm(total=len(inits) * len(RATIOS) * cfg.seeds, desc="fine-tuning runs", disable=None) as bar:
        for variant, init in inits.items():
            results[variant] = finetune_runs(variant, init, cfg, runs, rendered, bar)
    timings["finetune (all)"] = round(time.time() - t)
    timings["total"] = round(time.time() - start)

    # 4. results
    os.makedirs(results_dir, exist_ok=True)
    write_atomic(os.path.join(results_dir, f"{name}.json"), json.dumps(results, indent=1) + "\n")
    details = {"command": command, "config": asdict(cfg), "linear_probe": probes, "fusion_check": found,
               "pooled_spread": spread,
               "seconds": timings, "torch": torch.__version__, "threads": torch.get_num_threads()}
    write_atomic(os.path.join(results_dir, f"{name}_checks.json"), json.dumps(details, indent=1) + "\n")
    md = (f"# MRM in miniature\n\n`{command}`: {timings['total'] / 60:.0f} minutes, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.\n\n"
          f"Test mean AUC x 100 over the six findings ({cfg.test_records} held-out radiographs), mean ± std over "
          f"{cfg.seeds} seed(s) (each seed draws its own label subset, head and crops):\n\n{table(results)}\n\n"
          "Linear probe (logistic regression on the frozen encoder's pooled feature of the whole film, fitted to "
          "convergence, its weight decay chosen on validation; `scratch` is the random encoder), the same label "
          f"subsets:\n\n{table(probes)}\n\n"
          f"Fusion check: accuracy of the restored masked words of {cfg.check_records} held-out reports, "
          "from the radiograph, from noise in its place and from another report's radiograph (image_only: "
          "masked side, size and zone words "
          f"that no visible word of the report repeats; with_twin: the others):\n\n{fusion_table(found)}\n\n"
          "Spread of the pooled image feature between radiographs (std / mean norm; a random encoder: about 0.2): "
          + ", ".join(f"{v} {s:.3f}" for v, s in spread.items()) + "\n")
    write_atomic(os.path.join(results_dir, f"{name}.md"), md)
    plot(results, os.path.join(results_dir, f"{name}.png"))
    print(md)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, fewer records and steps (under 10 minutes); writes miniature_quick.*")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--runs", default="out/miniature", help="folder for the runs' checkpoints and logs")
    parser.add_argument("--results", default=HERE, help="folder for the .json/.md/.png results")
    parser.add_argument("--check", nargs="+", metavar="CKPT",
                        help="only run the fusion check and the pooled spread on these train.py checkpoints")
    args = parser.parse_args(argv)
    if args.check:
        for path in args.check:
            c, spread = check(path, checks.CHECK_START, MiniConfig.check_records)
            print(f"{path}: pooled spread {spread:.3f}" + (f"; {checks.summary(c)}" if c is not None else ""))
        return
    cfg = MiniConfig(**QUICK) if args.quick else MiniConfig()
    cfg.variants = tuple(v.strip() for v in args.variants.split(","))
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    command = "python experiments/miniature.py" + (" " + " ".join(sys.argv[1:] if argv is None else argv)).rstrip()
    run(cfg, os.path.join(args.runs, "quick" if args.quick else "full"), args.results,
        "miniature_quick" if args.quick else "miniature", command)


if __name__ == "__main__":
    main()
