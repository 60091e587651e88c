"""Price adapters: energy price and hashprice sources behind one protocol."""
