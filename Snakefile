# bcellmap: B-cell depletion and reconstitution after CD19 CAR-T therapy.
#
#   snakemake --cores 4                               # the built-in demo cohort
#   snakemake -s /path/to/bcellmap/Snakefile --cores 4 --configfile my.yaml
#
# Results go to results/ under the working directory; see README.md.

from snakemake.utils import min_version

min_version("9.0")


configfile: workflow.source_path("config/config.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/setup.smk"
include: "workflow/rules/ingest.smk"
include: "workflow/rules/normalise.smk"
include: "workflow/rules/cluster.smk"
include: "workflow/rules/annotate.smk"
include: "workflow/rules/scrna.smk"
include: "workflow/rules/quantify.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        all_targets(),
    default_target: True
