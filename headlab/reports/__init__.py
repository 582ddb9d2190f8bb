"""Reports: `headlab report NAME`, batch reports on benchmarks (report.json + report.md + report.html).

One module per report declares it (`REPORT = registry.Report(...)`: its options, its pipeline, its console
summary); the CLI's `headlab report` commands are generated from `registry.registered()`. A report builds its
content once as a `document.Document`, which `document.markdown` and `html.html_page` render; `output` holds
what every report shares at its edges (folders, atomic files, the folder's one plotly.min.js, n/a);
`figures` the figure shapes (categorical layer / head axes, bars with error bars), `thumbnails` the small
images of flipped-answer tables, `var_sinks` what VAR did in a run. The model runs behind the reports live
in `headlab.runs`.
"""
