"""`cxrray attribute`: one interface to every method that says where a finding is (`methods`: the map makers,
loaded once), its derived outputs with provenance (`outputs`: raw map as 16-bit PNG, overlay PNG, overlay
Secondary Capture DICOM built with highdicom, a JSON record) and the job over one file or a shards URI
(`job`: the shared fan-out, resumable, each output written exactly once). Above `pipelines`, beside `serve`:
it dispatches over several methods' packages."""
