"""Import TensorFlow only for data loading: quiet, and kept off the GPUs that PyTorch trains on."""

import os


def import_tensorflow():
    """Return the `tensorflow` module with its C++ logs silenced and every GPU hidden from it.

    The environment variables only take effect before the first import; set them here so every
    caller gets the same behaviour. A user's own setting of them wins.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # devices were already initialised: TF keeps the earlier setting
        pass
    return tf
