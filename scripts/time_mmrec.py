"""Time one of MMRec's own models with MMRec's own data loader and trainer: a training step, an epoch, an evaluation.

    python time_mmrec.py SRC MODEL DATA_ROOT DATASET DEVICE STEPS [key=value ...]

SRC is MMRec's src/ folder (../shared/reference/mmrec/src; nothing of MMRec is kept in this repository), MODEL its
class name (BPR, VBPR, LightGCN, FREEDOM, ...), DATA_ROOT/DATASET a folder in the MMRec layout whose DATASET.inter has
the columns userID, itemID and x_label and whose features are image_feat.npy (MMRec's v_feat) and text_feat.npy
(its t_feat). Every key of the model's grid (``hyper_parameters`` of SRC/configs/model/MODEL.yaml) takes its first
value, MMRec's default point, unless key=value sets it. Run with MMRec's dependencies (pandas): scripts/bench.py
starts it in a subprocess with ``--mmrec-python``, on the same device and thread count as our models.

Prints one JSON line: ``step_ms``, the median over STEPS batches of MMRec's loader (after 3 warm-up) of one step of
its trainer's loop (zero_grad, calculate_loss, backward, Adam); ``epoch_s``, one call of its trainer's
``_train_epoch`` after ``pre_epoch_processing`` (its loader's shuffling and negative sampling included); ``eval_s``,
one call of its trainer's ``evaluate`` on the valid users (full ranking, masking, top-k and its metrics).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch


def _value(text: str):
    """A key=value override's value: int, float, else YAML (a list such as [10,20], or the text itself)."""
    import yaml

    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def main(argv: list[str]) -> dict:
    src, model_name, root, dataset, device, steps = argv[:6]
    overrides = dict(kv.split("=", 1) for kv in argv[6:])
    sys.path.insert(0, os.path.abspath(src))
    os.chdir(src)  # MMRec reads configs/ relative to the working directory
    from utils.configurator import Config
    from utils.dataloader import EvalDataLoader, TrainDataLoader
    from utils.dataset import RecDataset
    from utils.utils import get_model, get_trainer, init_seed

    cfg = {"gpu_id": 0, "use_gpu": device.startswith("cuda"), "data_path": os.path.abspath(root) + os.sep,
           "USER_ID_FIELD": "userID", "ITEM_ID_FIELD": "itemID", "inter_file_name": f"{dataset}.inter",
           "vision_feature_file": "image_feat.npy", "text_feature_file": "text_feat.npy",
           "filter_out_cod_start_users": True, "field_separator": "\t", "seed": 999}
    cfg.update({k: _value(v) for k, v in overrides.items()})
    config = Config(model_name, dataset, cfg)
    for key in config["hyper_parameters"]:  # one grid point: MMRec's first value of each axis
        if isinstance(config[key], list):
            config[key] = config[key][0]
    init_seed(config["seed"])
    splits = RecDataset(config).split()
    for part in splits:  # its quick_start logs each split: str() sets the counts its loaders read
        str(part)
    train_set, valid_set, _ = splits
    train_data = TrainDataLoader(config, train_set, batch_size=config["train_batch_size"], shuffle=True)
    valid_data = EvalDataLoader(config, valid_set, additional_dataset=train_set, batch_size=config["eval_batch_size"])
    train_data.pretrain_setup()
    model = get_model(model_name)(config, train_data).to(config["device"])
    trainer = get_trainer()(config, model)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    model.pre_epoch_processing()
    model.train()
    batches: list = []
    while len(batches) < int(steps) + 3:  # passes over its loader (a tiny set has one batch)
        batches.extend(train_data)
    times = []
    for k, batch in enumerate(batches[: int(steps) + 3]):
        sync()
        t0 = time.perf_counter()
        trainer.optimizer.zero_grad()
        losses = model.calculate_loss(batch)
        (sum(losses) if isinstance(losses, tuple) else losses).backward()
        trainer.optimizer.step()
        sync()
        if k >= 3:
            times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    model.pre_epoch_processing()
    trainer._train_epoch(train_data, 0)
    sync()
    epoch_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.evaluate(valid_data)
    sync()
    eval_s = time.perf_counter() - t0
    return {"impl": f"MMRec {model_name}", "device": device, "threads": torch.get_num_threads(),
            "step_ms": 1e3 * statistics.median(times), "steps_timed": len(times), "steps_per_epoch": len(train_data),
            "epoch_s": epoch_s, "eval_s": eval_s}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
