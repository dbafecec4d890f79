"""`lgur index --video PATH`: adds the video options to `lgur index` (defined by lgur.search.cli) and runs
the video pipeline when --video is given, the image index otherwise."""
from __future__ import annotations

import argparse

VIDEO_OPTIONS = ("video", "fps", "detector", "score_threshold", "min_height", "frames_fps")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.choices["index"]
    p.add_argument("--video", help="video file, folder of videos, or folder of frames (one sequence per folder): "
                                   "people are detected, tracked and their crops indexed (instead of --images)")
    p.add_argument("--fps", type=float, help="--video: frames sampled per second (default: video.fps = 2)")
    p.add_argument("--detector", help="--video: ssd-mobilenet | hog | onnx:PATH (default: video.detector = auto: "
                                      "ssd-mobilenet if lgur[video] is installed, else hog)")
    p.add_argument("--score-threshold", type=float, help="--video: detector score threshold (default 0.5)")
    p.add_argument("--min-height", type=int, help="--video: drop person boxes lower than this many pixels "
                                                   "(default: video.min_height = 48)")
    p.add_argument("--frames-fps", type=float, help="--video: frame rate of a folder of frames (default 10)")
    images_cmd = p.get_default("func")

    def index_cmd(args: argparse.Namespace) -> int:
        from lgur.errors import LgurError

        if args.video is None:
            for opt in VIDEO_OPTIONS[1:]:
                if getattr(args, opt) is not None:
                    raise LgurError(f"--{opt.replace('_', '-')} applies to --video only")
            return images_cmd(args)
        if args.images is not None:
            raise LgurError("give --images or --video, not both")
        return video_index_cmd(args)

    p.set_defaults(func=index_cmd)


def video_index_cmd(args: argparse.Namespace) -> int:
    from lgur.errors import LgurError
    from lgur.search.cli import apply_faiss_threads, command_config
    from lgur.video.ingest import VideoSettings, index_video

    if args.nproc is not None and args.nproc > 1 or args.meta or args.meta_pattern:
        raise LgurError("--video indexes on one process and writes its own metadata (video, time, box, track); "
                        "leave out --nproc, --meta and --meta-pattern")
    cfg = command_config(args, "index --video", sections=("search", "video"))
    scfg = cfg.search
    apply_faiss_threads(scfg)
    settings = VideoSettings.from_config(cfg.video, fps=args.fps, detector=args.detector,
                                         score_threshold=args.score_threshold, min_height=args.min_height,
                                         frames_fps=args.frames_fps)
    _, report, vreport = index_video(args.checkpoint, args.video, args.out, settings, dtype=args.dtype or scfg.dtype,
                                     batch_size=args.batch_size or scfg.batch_size,
                                     num_workers=scfg.num_workers if args.workers is None else args.workers,
                                     device=args.device or cfg.device, ann=args.ann, pca=args.pca, search_cfg=scfg,
                                     progress=not args.quiet)
    print(vreport.summary())
    print(report.summary())
    print(f"index written to {args.out} (crops and frames in {args.out.rstrip('/')}.media)")
    return 0
