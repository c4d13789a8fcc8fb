"""Convert LIBERO HDF5 demonstrations (one <task>_demo.hdf5 per task) into the modified-LIBERO RLDS format.

    python vla-scripts/convert_libero_to_rlds.py --libero_hdf5_dir /data/LIBERO/libero_90 \
        --output_dir /data/rlds --dataset_name libero_90_no_noops [--image_size 256] [--filter_noops true]

Then train with `--data_root_dir /data/rlds --vla.data_mix libero_90`. What is converted, the exact
no-op rule and the differences from OpenVLA's regenerated data: prismatic/vla/datasets/libero_hdf5.py.
"""

from prismatic.vla.datasets.libero_hdf5 import main

if __name__ == "__main__":
    main()
