"""Stage 2 in verl's v1 trainer: the sparse-reasoning stream between replay-buffer sampling and
``compute_log_prob`` (``trainer.v1.trainer_mode=tsparse_dualstream``).

NOT EXECUTED IN THIS REPOSITORY'S TESTS. verl 0.9.1's v1 trainer imports TransferQueue, and
runs vLLM replicas on GPUs; neither exists on the machine this was written on. Everything this
module calls that does not touch TransferQueue, Ray or vLLM is tested on the CPU
(:func:`~.rollout.sparse_phase`, :func:`~.rollout.sparse_prompt_ids`,
:func:`~.rollout.sequence_record`, the reward and advantage functions, the engine with the
flag). The glue below follows verl 0.9.1's source (``verl/trainer/ppo/v1/trainer_base.py``,
``trainer_sync.py``, ``agent_loop_tq.py``, ``padding_utils.py``); treat its first GPU run as
its test.

The step (``PPOTrainerSync`` with one override, :meth:`DualStreamTrainer._balance_batch`,
which verl calls right after sampling and after the vLLM replicas went to sleep):

1. the sampled batch holds the LOCALIZATION rollouts (verl's single-turn agent loop on vLLM,
   dense images - vLLM can serve that stream), keys ``{uid}_{session}_0``;
2. their prompts / responses / ``multi_modal_inputs`` / question / ground truth are read from
   the TransferQueue; each becomes a :class:`~.rollout.SparseRequest` (the sparse prompt built
   from the question and the already-processed images, the boxes parsed from the response);
3. every actor rank answers its share with HF ``generate`` on its FSDP module
   (:meth:`DualStreamWorker.tsparse_sparse_rollout`, ``synced_gpus``), G' responses each;
4. rewards of both streams with cross-feedback (:func:`tsparse.dualstream.rewards.score_dual_stream`);
   the localization rows get their new ``rm_scores``, ``tsparse_stream=0`` and the tsparse box
   keys (dense) in ``multi_modal_inputs``; the sparse rows are written under new keys
   ``{uid}_{session}_{1 + j}`` with ``uid`` = their GRPO group and the boxes;
5. verl's step continues unchanged on the union (balance, old log-probs with the pruning
   forward, reference, ``tsparse_dualstream`` advantages, actor update).

Settings: ``trainer.v1.tsparse_dualstream`` (verl's place for a trainer mode's section):
``method`` (a method config path, default ``configs/dualstream.yaml``), ``n_sparse`` (G',
default the method's ``sparse_group_size``), ``max_new_tokens`` (default
``data.max_response_length``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import ray
import torch
import torch.distributed as dist
import transfer_queue as tq
from tensordict import NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

from verl.single_controller.base.decorator import Dispatch, register
from verl.trainer.ppo.utils import Role
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils.tensordict_utils import list_of_dict_to_tensordict
from verl.workers.engine_workers import ActorRolloutRefWorker

from ...dualstream.advantages import LOCALIZATION, SPARSE
from ...dualstream.config import load_method_config
from ...dualstream.format import parse_boxes
from ...dualstream.models import VLProcessor
from ...dualstream.rewards import GroundTruth, score_dual_stream
from .advantages import group_uid
from .losses import STREAM_FIELD
from .rollout import SequenceRecord, SparseRequest, sequence_record, sparse_phase, sparse_prompt_ids

MODE = "tsparse_dualstream"


class DualStreamWorker(ActorRolloutRefWorker):
    """verl's actor/rollout/ref worker plus the sparse-stream generation on the actor module."""

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def tsparse_sparse_rollout(self, requests: list, settings: dict):
        rank, world = dist.get_rank(), dist.get_world_size()
        mine = [(i, r) for i, r in enumerate(requests) if i % world == rank]
        engine = self.actor.engine
        method = load_method_config(settings.get("method"))
        if not hasattr(self, "_tsparse_processor"):
            self._tsparse_processor = VLProcessor.from_pretrained(engine.model_config.local_path)
        with engine.eval_mode():
            module = engine.module
            results = sparse_phase(
                module, [SparseRequest(**r) for _, r in mine], pruning=method.pruning,
                n_sparse=int(settings["n_sparse"]),
                generate_kwargs={"max_new_tokens": int(settings["max_new_tokens"]),
                                 "temperature": float(settings.get("temperature", 1.0)), "do_sample": True},
            )
            out = []
            for (i, req), res in zip(mine, results):
                for resp in res.responses:
                    rec = SequenceRecord(req["prompt_ids"], resp, req["pixel_values"], req["image_grid_thw"], SPARSE,
                                         "", "", 0, 0.0, {}, self._tsparse_processor.decode(resp), req["boxes"],
                                         res.keep_ratio, res.fallback)
                    fields = sequence_record(rec, module, self._tsparse_processor.image_token_id)
                    out.append((i, fields, rec.text, res.keep_ratio))
        return out


@register_trainer(MODE)
class DualStreamTrainer(PPOTrainerSync):
    """``PPOTrainerSync`` with the sparse-reasoning stream after sampling (module docstring)."""

    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        for role in (Role.Actor, Role.ActorRollout, Role.ActorRolloutRef, Role.RefPolicy):
            if role in self.role_worker_mapping:
                self.role_worker_mapping[role] = ray.remote(DualStreamWorker)

    def _settings(self) -> dict:
        from .options import options_from_model_config

        section = dict(self.config.trainer.v1.get(MODE, {}) or {})
        method = load_method_config(section.get("method"))
        opts = options_from_model_config(self.config.actor_rollout_ref.model)
        if opts is None or not opts.prune_visual:
            raise ValueError(
                f"trainer_mode={MODE} needs actor_rollout_ref.model.use_fused_kernels=True, "
                "fused_kernel_options.impl_backend=tsparse and prune_visual=true (the training forward must prune "
                "as the rollout did)"
            )
        mine = {k: getattr(method.pruning, k) for k in ("fuse", "fallback", "margin", "min_coverage")}
        theirs = {k: getattr(opts.pruning, k) for k in mine}
        if mine != theirs:
            raise ValueError(
                f"actor_rollout_ref.model.fused_kernel_options.pruning {theirs} differs from the method config's "
                f"pruning {mine}: the policy would train on other tokens than the rollout saw"
            )
        return {
            "method": section.get("method"),
            "n_sparse": int(section.get("n_sparse") or method.advantages.sparse_group_size),
            "max_new_tokens": int(section.get("max_new_tokens") or self.config.data.max_response_length),
            "temperature": float(self.config.actor_rollout_ref.rollout.temperature),
            "sparse_group": method.advantages.sparse_group,
        }

    def _balance_batch(self, batch: KVBatchMeta, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        batch = self._sparse_stream(batch, metrics)
        return super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    def _sparse_stream(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        settings = self._settings()
        method = load_method_config(settings["method"])
        fields = ["prompts", "responses", "multi_modal_inputs", "extra_info", "reward_model", "uid"]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        proc = VLProcessor.from_pretrained(self.config.actor_rollout_ref.model.path)
        responses = list(data["responses"].unbind())
        texts = [proc.decode(r) for r in responses]
        mm = list(data["multi_modal_inputs"])
        extra = list(data["extra_info"])
        gts = [GroundTruth.coerce(rm["ground_truth"], ex) for rm, ex in zip(list(data["reward_model"]), extra)]
        requests = []
        for k, key in enumerate(batch.keys):
            grid = mm[k]["image_grid_thw"]
            requests.append({
                "prompt_ids": sparse_prompt_ids(proc, method, ex_question(extra[k]), grid),
                "pixel_values": mm[k]["pixel_values"],
                "image_grid_thw": grid,
                "boxes": tuple(parse_boxes(texts[k], max_boxes=method.format.max_boxes).boxes),
            })
        world = self.actor_rollout_wg.world_size
        padded = requests + [requests[i % len(requests)] for i in range(max(0, world - len(requests)))]
        per_rank = self.actor_rollout_wg.tsparse_sparse_rollout(padded, settings)
        sparse = defaultdict(list)  # request index -> [(fields, text, keep_ratio)]
        for rank_out in per_rank:
            for i, fields_i, text, ratio in rank_out:
                if i < len(requests):
                    sparse[i].append((fields_i, text, ratio))

        # Rewards with cross-feedback, per question uid (sessions in key order).
        by_uid: dict = defaultdict(list)
        for k, key in enumerate(batch.keys):
            uid, session, _ = key.rsplit("_", 2)
            by_uid[uid].append((int(session), k))
        uids = list(by_uid)
        loc_texts, sparse_texts, order = [], [], []
        for uid in uids:
            rows = sorted(by_uid[uid])
            order.append(rows)
            loc_texts.append([texts[k] for _, k in rows])
            sparse_texts.append([[t for _, t, _ in sparse[k]] for _, k in rows])
        scores = score_dual_stream(loc_texts, [gts[by_uid[u][0][1]] for u in uids], sparse_texts,
                                   weights=method.rewards, max_boxes=method.format.max_boxes)

        loc_updates, new_keys, new_fields, new_tags = {}, [], [], []
        for qi, uid in enumerate(uids):
            for gi, (session, k) in enumerate(order[qi]):
                r = responses[k].shape[0]
                rm = torch.zeros(r, dtype=torch.float32)
                rm[-1] = scores.localization[qi][gi].score
                n_img = int(mm[k]["image_grid_thw"].shape[0])
                loc_mm = dict(mm[k], tsparse_prune=torch.zeros(n_img, dtype=torch.int64),
                              tsparse_box_counts=torch.zeros(n_img, dtype=torch.int64),
                              tsparse_boxes=torch.zeros(0, 4))
                loc_updates[k] = (rm, loc_mm)
                for j, (fields_j, _, _) in enumerate(sparse[k]):
                    f = dict(fields_j)
                    f["rm_scores"] = torch.zeros_like(f["rm_scores"])
                    f["rm_scores"][-1] = scores.sparse[qi][gi][j].score
                    f["uid"] = group_uid(uid, SPARSE, session, sparse_group=settings["sparse_group"])
                    f["num_turns"] = 2
                    new_keys.append(f"{uid}_{session}_{1 + j}")
                    new_fields.append(f)
                    tag = dict(batch.tags[k])
                    p, rl = f["prompts"].shape[0], f["responses"].shape[0]
                    tag.update({"prompt_len": p, "response_len": rl, "seq_len": p + rl})
                    new_tags.append(tag)

        idx = sorted(loc_updates)
        keys = [batch.keys[k] for k in idx]
        tq.kv_batch_put(
            keys=keys,
            partition_id=batch.partition_id,
            fields=TensorDict(
                {
                    "rm_scores": torch.nested.as_nested_tensor([loc_updates[k][0] for k in idx], layout=torch.jagged),
                    "multi_modal_inputs": NonTensorStack(*[loc_updates[k][1] for k in idx]),
                    STREAM_FIELD: torch.full((len(idx),), LOCALIZATION, dtype=torch.int64),
                },
                batch_size=[len(idx)],
            ),
        )
        if new_keys:
            tq.kv_batch_put(keys=new_keys, partition_id=batch.partition_id,
                            fields=list_of_dict_to_tensordict(new_fields), tags=new_tags)
        ratios = [ratio for rows in sparse.values() for _, _, ratio in rows]
        metrics["tsparse/keep_ratio"] = sum(ratios) / len(ratios) if ratios else 1.0
        for stream in ("localization", "sparse"):
            for name, v in scores.mean_terms(stream).items():
                metrics[f"tsparse/reward/{stream}/{name}"] = v
        return KVBatchMeta(keys=batch.keys + new_keys, tags=batch.tags + new_tags, partition_id=batch.partition_id,
                           fields=batch.fields, extra_info=batch.extra_info)


def ex_question(extra_info: Any) -> str:
    """The question text of a verl row (``extra_info.question``, written by
    :mod:`tsparse.integrations.verl.data`)."""
    if isinstance(extra_info, str):
        extra_info = json.loads(extra_info)
    q = (extra_info or {}).get("question")
    if not isinstance(q, str) or not q:
        raise ValueError(
            f"trainer_mode={MODE}: the dataset rows need extra_info.question (convert the data with "
            "python -m tsparse.integrations.verl.data)"
        )
    return q
