# Synthetic images: train the diffusion generator on real training slices, then sample.


rule train_generator:
    input:
        prepared=f"{PREPARED}/slices.parquet",
    output:
        # a diffusers pipeline folder: DiffusionPipeline.from_pretrained(GENERATOR) loads it
        model=f"{GENERATOR}/model_index.json",
        unet=f"{GENERATOR}/unet/config.json",
        scheduler=f"{GENERATOR}/scheduler/scheduler_config.json",
        log_table=f"{GENERATOR}/train_log.csv",
    params:
        code=stage_code("sraseg.generate.train"),
        settings=gpu_settings("generator"),
        prepared=input_dir("prepared"),
        out_dir=output_dir("log_table"),
    log:
        f"{LOGS}/train_generator.log",
    benchmark:
        f"{LOGS}/benchmarks/train_generator.tsv"
    threads: CPU_THREADS
    resources:
        gpu=1,
        mem_mb=16000,
        # The paper-sized generator trains for hours; resume from last.ckpt covers preemption.
        runtime=720,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m sraseg.device -- python -m sraseg train-generator --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"


rule sample:
    input:
        model=f"{GENERATOR}/model_index.json",
        prepared=f"{PREPARED}/slices.parquet",
    output:
        images=f"{SYNTHETIC}/images.npy",
        table=f"{SYNTHETIC}/synthetic.parquet",
        preview=f"{SYNTHETIC}/preview.png",
    params:
        code=stage_code("sraseg.generate.sample"),
        settings=gpu_settings("sample"),
        generator=input_dir("model"),
        prepared=input_dir("prepared"),
        out_dir=output_dir("images"),
    log:
        f"{LOGS}/sample.log",
    benchmark:
        f"{LOGS}/benchmarks/sample.tsv"
    threads: CPU_THREADS
    resources:
        gpu=1,
        mem_mb=16000,
        runtime=240,
    conda:
        "../../envs/gpu.yaml"
    shell:
        "python -m sraseg.device -- python -m sraseg sample --generator-dir {params.generator:q} --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q}"
        " --settings {params.settings:q} > {log:q} 2>&1"
