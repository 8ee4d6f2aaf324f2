from memit.stats.corpus import Corpus, resolve_corpus
from memit.stats.second_moment import SecondMomentCache, collect_second_moments

__all__ = ["Corpus", "SecondMomentCache", "collect_second_moments", "resolve_corpus"]
