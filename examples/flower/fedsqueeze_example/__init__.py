"""Flower app: FedAvg on scikit-learn's digits with fedsqueeze's codecs on both links."""
