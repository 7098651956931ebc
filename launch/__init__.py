"""Start vitscale jobs on one node, many nodes (hostfile: torchrun, DeepSpeed over pdsh or --no_ssh), or SLURM.

`python -m launch run|check|sbatch|accelerate-config ...`; see docs/multi-node.md.
"""
