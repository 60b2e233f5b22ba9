"""What Torchreid lacks, one module per concern; main.py drives Torchreid with it."""
import warnings

# torchreid==0.2.5 from PyPI ships no compiled evaluator and warns about it on import.
# Our engine evaluates with our own exact evaluator (reidkit.evaluation), so the warning
# would only mislead.
warnings.filterwarnings('ignore', message='Cython evaluation')
