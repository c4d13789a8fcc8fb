"""`--craft.retention_mode action`: keep the pretrained model's action-token distributions on the anchors
(distillation on old inputs, as in "Learning without Forgetting").

Each anchor is teacher-forced with its recorded action: the prompt, then the 7 action tokens, with labels on
those tokens. At each of the 7 positions the model's distribution over the 256 action bins (the logits of the
bin tokens, renormalised) is compared with the pretrained model's, cached as log-probabilities:
L_ret = mean over anchors and positions of KL(pretrained || current), in nats, so an epsilon means the same on
every model.
"""

import torch
import torch.nn.functional as F


class ActionSignal:
    mode = "action"
    target = "target_logprobs"  # float32 [N, action_dim, n_bins] in the cache
    teacher_forced = True  # the anchors carry their recorded action tokens, labelled
    loss_type = "kl"

    def targets(self, model, batch: dict) -> torch.Tensor:
        """[B, action_dim, n_bins] log-probabilities over the action bins at the labelled positions."""
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        config = model.config
        bins = out.action_logits[:, config.base_vocab_size - config.n_action_bins : config.base_vocab_size]
        return F.log_softmax(bins.float(), dim=-1).view(batch["labels"].shape[0], -1, config.n_action_bins)

    def per_anchor(self, model, batch: dict) -> torch.Tensor:
        """[B] KL(pretrained || current) of each anchor, averaged over its action positions."""
        target = batch[self.target].float()
        kl = (target.exp() * (target - self.targets(model, batch))).sum(dim=-1)
        return kl.mean(dim=-1)

    def __call__(self, model, batch: dict) -> torch.Tensor:
        return self.per_anchor(model, batch).mean()
