"""The experts' math, for every user of the pipeline: dense MLPs per family, the GPT-OSS GLU
and MXFP4 kernels, the math on experts in their stored form, and transformers' experts."""
