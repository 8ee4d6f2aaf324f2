from memit.stats.corpus import Corpus, CorpusError, load_corpus, resolve_corpus
from memit.stats.second_moment import SecondMomentCache, collect_second_moments

__all__ = ["Corpus", "CorpusError", "SecondMomentCache", "collect_second_moments", "load_corpus", "resolve_corpus"]
