"""`sparse-dc reproduce`: plan a small grid at fixed U, train it through the sweep runner, fit the law, report."""
