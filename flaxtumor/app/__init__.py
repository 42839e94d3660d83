"""The Gradio app's package: `ui` (layout and events), `service` (requests without Gradio), `server` (start-up),
`uploads` and `nifti_uploads` (checked uploads), `cache` (analyses kept for live re-rendering), `report` (tables,
summaries, downloads), `render` (overlays and legends), `model_card`, `examples`, `state`, `errors` and
`gradio_patches`. The old module names `flaxtumor.ui`, `flaxtumor.uploads`, `flaxtumor.app_state` and
`flaxtumor.app_errors` are these modules."""
