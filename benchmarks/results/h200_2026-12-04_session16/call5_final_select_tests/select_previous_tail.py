# scratch/select_previous.py of this call: `git show 29d65d8:dsaserve/kernels/select_gluon.py` (408 lines) followed
# by the lines of ../call2_select_one_barrier/select_previous_tail.py after its header, with
LABEL = "29d65d8 (before the _piece_stats refactor)"
