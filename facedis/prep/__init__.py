"""Data set preparation: ``facedis prepare`` (:mod:`facedis.prep.prepare`) and one module per data source."""
