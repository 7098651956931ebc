set -x
nvidia-smi -L; which python python3; ls /opt 2>/dev/null | head
PY=$(command -v python3 || command -v python)
$PY -c "import torch, deepspeed; print(torch.__version__, deepspeed.__version__, torch.cuda.is_available())" || { $PY -m pip --version; exit 3; }
pip install -q safetensors pyyaml webdataset 2>&1 | tail -2
timeout 240 $PY -m tests.faults.inputs checkpoints $OUT/ck 1-fp16 2-fp16 3-fp16 1-bf16 2-bf16 3-bf16 > $OUT/gen.log 2>&1; echo rc=$?
tail -5 $OUT/gen.log
$PY -c "
import glob
from torch.serialization import get_unsafe_globals_in_checkpoint as g
for d in sorted(glob.glob('$OUT/ck/*/global_step*')):
    s=set()
    for f in glob.glob(d+'/*.pt'): s|=set(g(f))
    print(d.split('/')[-2], sorted(s))
"
