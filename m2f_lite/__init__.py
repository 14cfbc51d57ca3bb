"""m2f_lite: Mask2Former (Cheng et al., CVPR 2022), small enough to read, faithful enough to reproduce.

Import what you need from its modules (``m2f_lite.modeling``, ``m2f_lite.criterion``, ...); this
file imports nothing heavy so that ``import m2f_lite`` stays fast.
"""

__version__ = "0.1.0"
