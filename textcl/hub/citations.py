"""The papers behind textcl's methods, as model cards cite them: name -> (what textcl uses it for, BibTeX)."""

from __future__ import annotations

CITATIONS: dict[str, tuple[str, str]] = {
    "InfoNCE": ("the contrastive loss", """@article{oord2018cpc,
  title={Representation Learning with Contrastive Predictive Coding},
  author={van den Oord, Aaron and Li, Yazhe and Vinyals, Oriol},
  journal={arXiv preprint arXiv:1807.03748},
  year={2018}
}"""),
    "SimCSE": ("dropout positives / the training-only MLP head", """@inproceedings{gao2021simcse,
  title={{SimCSE}: Simple Contrastive Learning of Sentence Embeddings},
  author={Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},
  booktitle={Proceedings of the 2021 Conference on Empirical Methods in Natural Language Processing},
  year={2021}
}"""),
    "SupCon": ("rows sharing a label as extra positives", """@inproceedings{khosla2020supcon,
  title={Supervised Contrastive Learning},
  author={Khosla, Prannay and Teterwak, Piotr and Wang, Chen and Sarna, Aaron and Tian, Yonglong and Isola, Phillip
    and Maschinot, Aaron and Liu, Ce and Krishnan, Dilip},
  booktitle={Advances in Neural Information Processing Systems},
  year={2020}
}"""),
    "GradCache": ("exact large-batch gradients at chunk-sized memory", """@inproceedings{gao2021gradcache,
  title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
  author={Gao, Luyu and Zhang, Yunyi and Han, Jiawei and Callan, Jamie},
  booktitle={Proceedings of the 6th Workshop on Representation Learning for NLP},
  year={2021}
}"""),
    "MoCo": ("the momentum encoder and its queue of negatives", """@inproceedings{he2020moco,
  title={Momentum Contrast for Unsupervised Visual Representation Learning},
  author={He, Kaiming and Fan, Haoqi and Wu, Yuxin and Xie, Saining and Girshick, Ross},
  booktitle={Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition},
  year={2020}
}"""),
    "DCL": ("the debiased contrastive loss (tau_plus)", """@inproceedings{chuang2020dcl,
  title={Debiased Contrastive Learning},
  author={Chuang, Ching-Yao and Robinson, Joshua and Lin, Yen-Chen and Torralba, Antonio and Jegelka, Stefanie},
  booktitle={Advances in Neural Information Processing Systems},
  year={2020}
}"""),
    "Matryoshka": ("the loss at several truncated dimensions", """@inproceedings{kusupati2022matryoshka,
  title={Matryoshka Representation Learning},
  author={Kusupati, Aditya and Bhatt, Gantavya and Rege, Aniket and Wallingford, Matthew and Sinha, Aditya and
    Ramanujan, Vivek and Howard-Snyder, William and Chen, Kaifeng and Kakade, Sham and Jain, Prateek and Farhadi, Ali},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}"""),
    "GISTEmbed": ("the guide model that masks false negatives", """@article{solatorio2024gistembed,
  title={{GISTEmbed}: Guided In-sample Selection of Training Negatives for Text Embedding Fine-tuning},
  author={Solatorio, Aivin V.},
  journal={arXiv preprint arXiv:2402.16829},
  year={2024}
}"""),
    "ESimCSE": ("word-repetition augmentation of positives", """@inproceedings{wu2022esimcse,
  title={{ESimCSE}: Enhanced Sample Building Method for Contrastive Learning of Unsupervised Sentence Embedding},
  author={Wu, Xing and Gao, Chaochen and Zang, Liangjun and Han, Jizhong and Wang, Zhongyuan and Hu, Songlin},
  booktitle={Proceedings of the 29th International Conference on Computational Linguistics},
  year={2022}
}"""),
    "NV-Retriever": ("hard negatives mined with a positive-aware threshold", """@article{moreira2024nvretriever,
  title={{NV-Retriever}: Improving text embedding models with effective hard-negative mining},
  author={Moreira, Gabriel de Souza P. and Osmulski, Radek and Xu, Mengyao and Ak, Ronay and Schifferer, Benedikt
    and Oldridge, Even},
  journal={arXiv preprint arXiv:2407.15831},
  year={2024}
}"""),
    "LoRA": ("the low-rank adapter", """@inproceedings{hu2022lora,
  title={{LoRA}: Low-Rank Adaptation of Large Language Models},
  author={Hu, Edward J. and Shen, Yelong and Wallis, Phillip and Allen-Zhu, Zeyuan and Li, Yuanzhi and Wang, Shean
    and Wang, Lu and Chen, Weizhu},
  booktitle={International Conference on Learning Representations},
  year={2022}
}"""),
}
