"""The prepared dataset: MAISI's preprocessing, TotalSegmentator masks, body regions, datalist and summary."""
