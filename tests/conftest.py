import os
import sys

# The torchvision workaround must run before any test module imports zennit or torchvision.
sys.path.insert(0, os.path.dirname(__file__))
import torchvision_ops  # noqa: E402,F401
