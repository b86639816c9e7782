"""Cluster launcher (``facedis submit``, ``facedis status``; needs ``facedis[cluster]``) and the
paper-table aggregator (``facedis aggregate``)."""
