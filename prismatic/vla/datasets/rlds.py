"""Stream normalised training frames from a mixture of RLDS datasets with tf.data.

Pipeline per dataset: read trajectories with images still JPEG-encoded -> standardize -> normalise
actions (BOUNDS_Q99) -> split into frames -> drop frames without an instruction. The datasets are
then sampled by weight x size, shuffled frame by frame, and only then decoded and resized, so the
shuffle buffer holds small JPEG bytes rather than decoded images.
"""

from pathlib import Path

import numpy as np
from tqdm import tqdm

from prismatic.util.tf_setup import import_tensorflow
from prismatic.vla.datasets.registry import DATASETS, DatasetConfig, check_data_root, resolve_mixture
from prismatic.vla.datasets.statistics import compute_or_load_statistics, normalize_bounds_q99, summarize

AUG_CROP_SCALE, AUG_CROP_RATIO = 0.9, 1.0
AUG_BRIGHTNESS, AUG_CONTRAST, AUG_SATURATION, AUG_HUE = 0.2, (0.8, 1.2), (0.8, 1.2), 0.05


def _read_trajectories(builder, config: DatasetConfig, split: str, *, shuffle_files: bool, seed: int):
    """Trajectories as {image (JPEG bytes), action, instruction}, each with a leading time axis (no proprio: like
    upstream's fine-tuning, training reads none)."""
    tf = import_tensorflow()
    import tensorflow_datasets as tfds

    def restructure(episode):
        traj = episode["steps"]
        if config.standardize is not None:
            traj = config.standardize(traj)
        obs = traj["observation"]
        action = tf.cast(traj["action"], tf.float32)
        return {
            "image": obs[config.image_obs_keys["primary"]],
            "action": action,
            "instruction": traj["language_instruction"],
            "episode_id": tf.fill([tf.shape(action)[0]], episode["tfds_id"]),
        }

    trajectories = builder.as_dataset(
        split=split,
        shuffle_files=shuffle_files,
        decoders={"steps": tfds.decode.SkipDecoding()},  # keep images as JPEG bytes
        # Order is ours to choose; the tfds id ("<file>__<index>") names each episode uniquely.
        read_config=tfds.ReadConfig(shuffle_seed=seed, enable_ordering_guard=False, add_tfds_id=True),
    )
    return trajectories.map(restructure, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _compute_statistics(builder, config: DatasetConfig) -> dict:
    """One pass over every split of the dataset (upstream uses all of it, validation included)."""
    actions = []
    trajectories = _read_trajectories(builder, config, "all", shuffle_files=False, seed=0)
    trajectories = trajectories.map(lambda t: {"action": t["action"]})
    total = sum(split.num_examples for split in builder.info.splits.values())
    for traj in tqdm(trajectories.as_numpy_iterator(), total=total, desc=f"Statistics of {config.name}"):
        actions.append(traj["action"])
    return summarize(np.concatenate(actions), num_trajectories=len(actions))


def _split(builder, train: bool) -> str:
    """Upstream: the `val` split if there is one, else train[:95%] / train[95%:], kept non-empty for tiny datasets."""
    splits = builder.info.splits
    if "val" in splits:
        return "train" if train else "val"
    if splits["train[:95%]"].num_examples > 0 and splits["train[95%:]"].num_examples > 0:
        return "train[:95%]" if train else "train[95%:]"
    num_episodes = splits["train"].num_examples
    if num_episodes < 2:
        return "train"
    return f"train[:{num_episodes - 1}]" if train else f"train[{num_episodes - 1}:]"


class RLDSStream:
    """An endless, shuffled stream of frames {image uint8 [S,S,3], action float32 [7], instruction, dataset_name,
    episode_id}.

    Iterating twice gives the same stream (everything random is seeded). With `world_size > 1`, each
    rank reads its own disjoint share of the episodes, with its rank mixed into the seed so that the
    ranks' sampling, shuffling and augmentation are independent.
    """

    def __init__(
        self,
        data_root_dir,
        data_mix: str,
        *,
        train: bool = True,
        image_size: int = 224,
        shuffle_buffer_size: int = 100_000,
        image_aug: bool = False,
        seed: int = 7,
        rank: int = 0,
        world_size: int = 1,
        skip_frames: int = 0,
    ):
        self.mixture = resolve_mixture(data_mix)
        check_data_root(data_root_dir, data_mix)
        import_tensorflow()
        import tensorflow_datasets as tfds

        self.train, self.image_size, self.image_aug = train, image_size, image_aug
        self._seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] >> 1)  # fits int32 and int64
        self.shuffle_buffer_size = shuffle_buffer_size
        self.skip_frames = skip_frames  # a resumed run continues exactly where its stream stopped
        self._builders, self._splits, self.statistics = {}, {}, {}
        for name, _ in self.mixture:
            config = DATASETS[name]
            builder_dir = Path(data_root_dir).expanduser() / name / config.version
            builder = tfds.builder_from_directory(str(builder_dir))
            stats = compute_or_load_statistics(builder_dir, config, lambda: _compute_statistics(builder, config))
            stats["action"]["mask"] = list(config.action_normalization_mask)
            self._builders[name], self.statistics[name] = builder, stats

            # A fixed, disjoint set of episodes per rank for the whole run (file shuffling stays within it).
            split = _split(builder, train)
            self._splits[name] = tfds.even_splits(split, n=world_size)[rank] if world_size > 1 else split
            if builder.info.splits[self._splits[name]].num_examples == 0:
                raise ValueError(
                    f"{name}: rank {rank} of world_size={world_size} gets none of the "
                    f"{builder.info.splits[split].num_examples} episodes of split {split!r}"
                )

    def __len__(self) -> int:
        """Upstream's nominal epoch in frames: sum of weight x size, relative to the largest weight (usually 1)."""
        weighted = sum(w * self.statistics[n]["num_transitions"] for n, w in self.mixture)
        return int(weighted / max(w for _, w in self.mixture))

    def __iter__(self):
        for frame in self._frames().as_numpy_iterator():
            yield {  # copies: TF hands out read-only arrays, which torch.from_numpy warns about
                "image": frame["image"].copy(),
                "action": frame["action"].copy(),
                "instruction": frame["instruction"].decode(),
                "dataset_name": frame["dataset_name"].decode(),
                "episode_id": frame["episode_id"].decode(),
            }

    def _dataset_frames(self, name: str):
        tf = import_tensorflow()
        builder, stats, config = self._builders[name], self.statistics[name], DATASETS[name]

        def normalize(traj):
            action = normalize_bounds_q99(traj["action"], stats["action"], stats["action"]["mask"])
            return {"image": traj["image"], "action": action, "instruction": traj["instruction"],
                    "episode_id": traj["episode_id"]}

        trajectories = _read_trajectories(builder, config, self._splits[name], shuffle_files=self.train,
                                          seed=self._seed).repeat()
        frames = trajectories.map(normalize, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
        frames = frames.filter(lambda f: f["instruction"] != "")
        return frames.map(lambda f: {**f, "dataset_name": tf.constant(name)})

    def _frames(self):
        tf = import_tensorflow()
        datasets = [self._dataset_frames(name) for name, _ in self.mixture]
        weights = np.array([w * self.statistics[n]["num_transitions"] for n, w in self.mixture], dtype=np.float64)
        frames = tf.data.Dataset.sample_from_datasets(datasets, (weights / weights.sum()).tolist(), seed=self._seed)
        frames = frames.shuffle(self.shuffle_buffer_size, seed=self._seed)

        def decode(index, frame):
            """JPEG bytes -> uint8 [S, S, 3], resized like upstream (lanczos3 with antialiasing), then augmented."""
            image = tf.io.decode_image(frame["image"], channels=3, expand_animations=False)
            image = tf.image.resize(image, (self.image_size, self.image_size), method="lanczos3", antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
            if self.image_aug:
                image = augment(image, seed=tf.stack([tf.constant(self._seed, tf.int64), index]))
            return {**frame, "image": image}

        # Skipped frames are never decoded; the index keeps augmentation seeds where they were.
        frames = frames.enumerate().skip(self.skip_frames)
        frames = frames.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        options = tf.data.Options()
        options.deterministic = True
        return frames.with_options(options).prefetch(2)


def augment(image, seed):
    """Upstream's training augmentation, in its order: random resized crop (scale 0.9, square), brightness,
    contrast, saturation, hue. Stateless ops keyed by `seed` ([2] ints), so the stream stays reproducible."""
    import tensorflow as tf  # already imported quietly by the pipeline that calls this

    seeds = tf.random.experimental.stateless_split(seed, num=5)
    size = tf.shape(image)[:2]
    x = tf.image.convert_image_dtype(image, tf.float32)

    height, width = np.sqrt(AUG_CROP_SCALE / AUG_CROP_RATIO), np.sqrt(AUG_CROP_SCALE * AUG_CROP_RATIO)
    top, left = tf.unstack(tf.random.stateless_uniform([2], seeds[0]) * [1.0 - height, 1.0 - width])
    box = tf.stack([top, left, top + height, left + width])[None]
    x = tf.image.crop_and_resize(x[None], box, box_indices=[0], crop_size=size)[0]

    x = tf.clip_by_value(tf.image.stateless_random_brightness(x, AUG_BRIGHTNESS, seeds[1]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_contrast(x, *AUG_CONTRAST, seeds[2]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_saturation(x, *AUG_SATURATION, seeds[3]), 0.0, 1.0)
    x = tf.clip_by_value(tf.image.stateless_random_hue(x, AUG_HUE, seeds[4]), 0.0, 1.0)
    return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)
