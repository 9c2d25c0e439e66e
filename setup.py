from setuptools import find_packages, setup

setup(
    name="anatomical-ldm",
    version="0.1.0",
    description="CompVis-compatible latent diffusion on current PyTorch/Lightning with anatomical register tokens "
    "for medical image generation",
    packages=find_packages(include=["ldm", "ldm.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "pytorch-lightning>=2.1,<3",
        "omegaconf>=2.3",
        "einops>=0.6",
        "nibabel>=5.0",
        "numpy>=1.24",
        "pillow>=9.0",
        "scipy>=1.10",
        "tqdm>=4.64",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        # `tensorboard --logdir logs` after install: main.py adds a TensorBoard logger when it is importable
        "tensorboard>=2.14",
        # MS-SSIM and the LPIPS linear-layer weights it ships (pytorch-lightning installs it too)
        "torchmetrics>=1.5",
        # the installable distribution of taming-transformers (provides VectorQuantizer2);
        # the registry's `taming-transformers` 0.0.1 lacks it
        "taming-transformers-rom1504>=0.0.6",
    ],
    extras_require={
        # pydicom writes the synthetic DICOM series of tests/test_dicom.py; torch-fidelity builds the FID
        # Inception network that tests/test_metrics_medical.py loads from a local file
        # nilearn ships the MNI ICBM152 template that bench/anatomy_mni.py (the benchmark's real-data arm) and
        # tests/test_bench_anatomy_mni.py read
        # highdicom writes the DICOM-SEG of tests/test_dicom.py; monai runs tests/test_monai_data.py;
        # pytest-xdist runs the suite on every core (`make test`); nnunetv2 checks and plans the exported
        # synthetic dataset in tests/test_export_dataset.py
        "test": ["pytest>=7.4", "pytest-xdist>=3", "SimpleITK>=2.2", "pydicom>=2.4", "torch-fidelity>=0.3",
                 "nilearn>=0.10", "highdicom>=0.28", "monai>=1.6", "nnunetv2>=2.5"],
        "bench": ["nilearn>=0.10"],
        # FID with the standard Inception weights (torch-fidelity's network, through torchmetrics)
        "metrics": ["torch-fidelity>=0.3"],
        # scripts/prepare_dicom.py and scripts/prepare_breastmri.py: DICOM series and NRRD/NIfTI masks (SimpleITK),
        # DICOM-SEG masks (highdicom)
        "dicom": ["SimpleITK>=2.2", "highdicom>=0.28"],
        # ldm/data/monai_data.py: training from a MONAI dataset / transform chain (monai 1.5.0 pins torch < 2.7;
        # 1.6.0 and 1.6.1 install next to torch 2.14, tested with 1.6.1)
        "monai": ["monai>=1.6"],
        # scripts/export_dataset.py's output planned and trained with nnU-Net v2 (nnUNetv2_plan_and_preprocess)
        "nnunet": ["nnunetv2>=2.5"],
    },
)
