"""Metrics for the three tasks, equal to the reference tools.

* :mod:`~m2f_lite.metrics.miou`: mIoU, fwIoU, pACC, mACC (detectron2's ``SemSegEvaluator``);
* :mod:`~m2f_lite.metrics.coco_ap`: mask AP through pycocotools' ``COCOeval``;
* :mod:`~m2f_lite.metrics.pq`: PQ / SQ / RQ, equal to panopticapi's ``pq_compute``;
* :mod:`~m2f_lite.metrics.panoptic_format`: the COCO panoptic PNG id encoding;
* :mod:`~m2f_lite.metrics.evaluators`: dataset evaluators that consume model outputs;
* :mod:`~m2f_lite.metrics.eval_files`: evaluation of prediction files, and a results table.

Nothing is imported here, so that ``pq_compute``'s worker processes start without torch.
"""
