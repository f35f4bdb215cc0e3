"""Component ids of the app, in one place: layouts, callbacks and browser tests import them from here."""

# views (sections of the page)
RUNS_VIEW = "runs-view"
HEAD_VIEW = "head-view"
PATTERN_VIEW = "pattern-view"
TOKENS_VIEW = "tokens-view"

# stores
SELECTED_HEAD = "selected-head"  # dcc.Store: {"layer": int, "head": int} or None

# runs view
RUN_SELECT = "run-select"
COMPARE_SELECT = "compare-select"  # optional second run: the head map shows the first minus this one
RUNS_TABLE = "runs-table"
RUN_INFO = "run-info"

# head map view
HEAD_RESULT = "head-result"
HEAD_MAP = "head-map"
HEAD_LABEL = "selected-head-label"
HEAD_STATUS = "head-status"

# attention pattern view
PROMPT_SELECT = "prompt-select"
CUSTOM_PROMPT = "custom-prompt"
RUN_PROMPT = "run-prompt"  # button: run the typed prompt (typing alone never starts a live run)
WINDOW_START = "window-start"
WINDOW_SIZE = "window-size"
PATTERN = "pattern"
PATTERN_LOADING = "pattern-loading"
PATTERN_STATUS = "pattern-status"
PATTERN_BUSY = "pattern-busy"
PATTERN_MODE = "pattern-mode"  # radio: the full pattern or one query row as a token strip
QUERY_ROW = "query-row"  # the query row shown as a strip (empty = last token); a click on the pattern sets it

# tokens view
TOKEN_RESULT = "token-result"
TOKEN_STRIP = "token-strip"
TOKEN_START = "token-start"  # first token of the page shown (prompts longer than TOKEN_PAGE tokens are paged)
TOKEN_STATUS = "token-status"

# ablation scoring view
ABLATION_VIEW = "ablation-view"
ABL_SOURCE = "ablation-source"  # radio: "selected" head or "top" k of the head map's score
ABL_K = "ablation-k"
ABL_METRIC = "ablation-metric"
ABL_SEEDS = "ablation-seeds"
ABL_RUN = "ablation-run"  # button
ABL_FIGURE = "ablation-figure"
ABL_TABLE = "ablation-table"
ABL_STATUS = "ablation-status"
ABL_BUSY = "ablation-busy"

# vision view (VLM runs only)
VISION_VIEW = "vision-view"
VISION_SOURCE = "vision-source"  # dropdown: a run image index, or "upload"
VISION_UPLOAD = "vision-upload"
VISION_QUESTION = "vision-question"
VISION_FIGURE = "vision-figure"
VISION_STATUS = "vision-status"
VISION_BUSY = "vision-busy"

# interventions view (a prompt on the run's model without and with an intervention)
IV_VIEW = "interventions-view"
IV_METHOD = (
    "iv-method"  # dropdown: registry method names, and "fitted:RUN" for fitted interventions in the runs directory
)
IV_PARAMS = "iv-params"  # k=v pairs (registry.build), whitespace-separated
IV_INFO = "iv-info"  # the method's one-line description and whether it runs on this model
IV_PROMPT = "iv-prompt"
IV_ANSWER = "iv-answer"  # optional expected answer
IV_RUN = "iv-run"  # button
IV_OUTPUTS = "iv-outputs"  # table: both greedy outputs and the answer probability
IV_FIGURE = "iv-figure"  # attention difference of the selected head
IV_STATUS = "iv-status"
IV_BUSY = "iv-busy"

# explore views (attnlab.apps.explore): a grid of heads, two prompts compared, head direct logit attribution. They
# use the attention pattern view's prompt (a run prompt or the typed one) and the selected head.
GRID_VIEW = "grid-view"
GRID_LAYER = "grid-layer"  # dropdown: a layer, or "selected" (the selected head's layer)
GRID_FIGURE = "grid-figure"
GRID_STATUS = "grid-status"
CMP_VIEW = "compare-prompts-view"
CMP_PROMPT = "compare-prompt"  # the second prompt (B); A is the pattern view's prompt
CMP_SCOPE = "compare-scope"  # radio: "head" (the selected head) or "layer" (every head of its layer)
CMP_RUN = "compare-run"  # button
CMP_FIGURE = "compare-figure"
CMP_STATUS = "compare-status"
DLA_VIEW = "dla-view"
DLA_ANSWER = "dla-answer"
DLA_CONTRAST = "dla-contrast"  # optional: attribute logit(answer) - logit(contrast)
DLA_RUN = "dla-run"  # button
DLA_FIGURE = "dla-figure"
DLA_STATUS = "dla-status"

# the workbench shell (issue #19): left panel, tabs, theme, keys, URL state
URL = "url"  # dcc.Location: the run, score, head, prompt, tab and compared run live in its query string
URL_INIT = "url-init"  # dcc.Store: the view the page was opened with (parsed query), until it has been applied
PAGE = "page"  # the container the page is rendered into from the URL (once per page load)
THEME = "theme"  # dmc.MantineProvider: forceColorScheme "light" / "dark"
THEME_TOGGLE = "theme-toggle"  # dmc.Switch: dark mode (kept in the browser's local storage)
TABS = "tabs"  # dmc.Tabs: runs, heads, pattern, explore, tokens, interventions, ablation, vision
TAB_VISION = "tab-vision"  # the Vision tab's button (shown for vision-language runs only)
KEY_STEP = "key-step"  # dcc.Store written by the page's key handler: {"step": "head+1" | "head-1" | ..., "t": ms}
GRID_SHAPE = "grid-shape"  # dcc.Store: [n_layers, n_heads] of the selected score's grid (for steps in the browser)
HEAD_PREV = "head-prev"  # buttons in the left panel doing what the keys do
HEAD_NEXT = "head-next"
LAYER_PREV = "layer-prev"
LAYER_NEXT = "layer-next"
PROMPT_PREVIEW = "prompt-preview"  # the chosen prompt's text, in the left panel
TOP_HEADS = "top-heads"  # AG Grid: the score's heads ranked (a row click selects the head)
PATTERN_LOG = "pattern-log"  # checkbox: the pattern's colour on a log scale (sinks dwarf everything else)
TOKENS_HEAD = "tokens-head"  # the selected head's attention from the token score's prompt's last token

# census view (Heads tab; runs written by `attnlab census`)
CENSUS_VIEW = "census-view"
CENSUS_X = "census-x"
CENSUS_Y = "census-y"
CENSUS_FIGURE = "census-figure"
CENSUS_OTHER = "census-other"  # the compared run's census, side by side, same statistics
CENSUS_EXAMPLES = "census-examples"  # the clicked head's pattern on its top examples
CENSUS_STATUS = "census-status"
MODEL_CARD = "model-card"  # the run's model: architecture, layers x heads, KV heads, dataset, when
