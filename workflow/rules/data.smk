# Data: the built-in phantoms (sources phantom and fives_phantom) and the prepare stage.


# The built-in phantoms write raw files in their dataset's release layout: fives_phantom for FIVES
# (sources fives_phantom and fives), phantom for ACDC (sources phantom and acdc).
if DATASET == "fives":

    rule fives_phantom:
        output:
            directory(f"resources/{DS}/raw"),
        params:
            code=stage_code("sraseg.data.fives_phantom"),
            train=lookup(dpath="fives_phantom/train", within=config),
            test=lookup(dpath="fives_phantom/test", within=config),
            size=lookup(dpath="fives_phantom/size", within=config),
            seed=lookup(dpath="fives_phantom/seed", within=config),
        log:
            f"{LOGS}/phantom.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../../envs/cpu.yaml"
        shell:
            "python -m sraseg fives-phantom --out-dir {output:q} --train {params.train:q} --test {params.test:q}"
            " --size {params.size:q} --seed {params.seed:q} > {log:q} 2>&1"

elif DATASET == "acdc":

    rule phantom:
        output:
            directory(f"resources/{DS}/raw"),
        params:
            code=stage_code("sraseg.data.phantom"),
            patients=lookup(dpath="phantom/patients", within=config),
            seed=lookup(dpath="phantom/seed", within=config),
            version=lookup(dpath="phantom/version", within=config),
        log:
            f"{LOGS}/phantom.log",
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "../../envs/cpu.yaml"
        shell:
            "python -m sraseg phantom --out-dir {output:q} --patients {params.patients:q} --seed {params.seed:q}"
            " --phantom-version {params.version:q} > {log:q} 2>&1"


# One prepare rule for every dataset: sraseg.datasets.prepare with the dataset's module (--dataset).
rule prepare:
    input:
        raw=raw_dir(),
        splits=[f"{config['dataset']['splits_dir']}/{s}.txt" for s in ("train", "val", "test")],
        labeled=f"{config['dataset']['splits_dir']}/{config['dataset']['labeled']}",
    output:
        slices=f"{PREPARED}/slices.parquet",
        images=f"{PREPARED}/images.npy",
        labels=f"{PREPARED}/labels.npy",
        volumes=f"{PREPARED}/volumes.parquet",
        settings=f"{PREPARED}/prepare.json",
    params:
        code=stage_code("sraseg.datasets.prepare", DATASET_MODULE),
        dataset=DATASET,
        splits_dir=input_dir("labeled"),
        image_size=lookup(dpath="prepare/image_size", within=config),
        out_dir=output_dir("slices"),
    log:
        f"{LOGS}/prepare.log",
    threads: 1
    resources:
        # Every slice of the dataset is held in memory once (ACDC at 256 px: about 1 GB). FIVES decodes its
        # 2048 x 2048 RGB images one at a time: 0.8 GB peak measured for 16 and 32 of them, flat over the
        # count (benchmarks/fives_real_size.py, docs/studies/fives-real-size.md); the prepared arrays'
        # pages add 0.33 MB an image at 256 px, 0.26 GB for the release's 800.
        mem_mb=2000 if DATASET == "fives" else 8000,
        runtime=120 if DATASET == "fives" else 60,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m sraseg prepare --dataset {params.dataset:q} --raw-dir {input.raw:q} --splits-dir {params.splits_dir:q}"
        " --labeled {input.labeled:q} --image-size {params.image_size:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"


# train.unlabeled real: the real unlabeled training slices in the sample stage's layout.
rule real_pool:
    input:
        slices=f"{PREPARED}/slices.parquet",
        images=f"{PREPARED}/images.npy",
    output:
        images=f"{REAL_POOL}/images.npy",
        table=f"{REAL_POOL}/synthetic.parquet",
        record=f"{REAL_POOL}/pool.json",
    params:
        code=stage_code("sraseg.data.real_pool"),
        prepared=input_dir("slices"),
        out_dir=output_dir("images"),
    log:
        f"{LOGS}/real_pool.log",
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
    conda:
        "../../envs/cpu.yaml"
    shell:
        "python -m sraseg real-pool --prepared-dir {params.prepared:q} --out-dir {params.out_dir:q} > {log:q} 2>&1"
