# Predict the test volumes and score them with the shared metric code.


# One rule each for every dataset: sraseg.evaluate.predict and sraseg.evaluate.run with the dataset's
# module (--dataset), which says how an image is read, segmented and written, and how a case is scored.
rule predict:
    input:
        model=f"{RESULTS}/{{exp}}/seed{{seed}}/model.safetensors",
        volumes=f"{PREPARED}/volumes.parquet",
    output:
        directory(f"{RESULTS}/{{exp}}/seed{{seed}}/predictions"),
    params:
        code=stage_code("sraseg.evaluate.predict", DATASET_MODULE),
        dataset=DATASET,
        prepared=input_dir("volumes"),
        device=config["device"],
    log:
        f"{LOGS}/predict_{{exp}}_seed{{seed}}.log",
    threads: CPU_THREADS
    resources:
        gpu=1,
        # FIVES: 0.8 GB peak measured on the CPU for 4 and 8 images of 2048 x 2048, flat over the count
        # (benchmarks/fives_real_size.py); a GPU's runtime adds host memory that was not measured.
        mem_mb=4000 if DATASET == "fives" else 8000,
        runtime=60,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m sraseg.device -- python -m sraseg predict --dataset {params.dataset:q} -m {input.model:q}"
        " --prepared-dir {params.prepared:q} --split test --device {params.device:q} -o {output:q} > {log:q} 2>&1"


rule evaluate:
    input:
        predictions=f"{RESULTS}/{{exp}}/seed{{seed}}/predictions",
        raw=raw_dir(),
    output:
        per_case=f"{RESULTS}/{{exp}}/seed{{seed}}/eval/metrics_per_case.csv",
        summary=f"{RESULTS}/{{exp}}/seed{{seed}}/eval/summary.json",
    params:
        code=stage_code("sraseg.evaluate.run", DATASET_MODULE),
        dataset=DATASET,
        out_dir=output_dir("summary"),
    log:
        f"{LOGS}/evaluate_{{exp}}_seed{{seed}}.log",
    threads: 1
    resources:
        # FIVES's stacked mode scores all test images as one volume: measured 1.2 GB for 8 images of
        # 2048 x 2048 and 71 MB more per image (benchmarks/fives_real_size.py,
        # docs/studies/fives-real-size.md), so 15 GB for the release's 200. ACDC scores one volume at a time.
        mem_mb=18000 if DATASET == "fives" else 4000,
        runtime=60 if DATASET == "fives" else 30,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m sraseg evaluate --dataset {params.dataset:q} --pred-dir {input.predictions:q} --gt-dir {input.raw:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"
